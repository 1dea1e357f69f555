"""GPTQ's Triton column kernel against the PyTorch loop it replaces on CUDA. Without a GPU it runs
in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py: the same kernel, executed with
NumPy on CPU tensors); on a CUDA machine the same tests run compiled."""
import pytest
import torch

pytest.importorskip("triton")

from quant import gptq  # noqa: E402
from quant.fake_quant import fake_quantize_prepared  # noqa: E402
from quant.scheme import QScheme  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel():
    from quant.gptq_kernel import columns  # interpreted without CUDA (tests/conftest.py)
    return columns


def _problem(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(4 * in_f, in_f, generator=g) @ mix  # correlated inputs: off-diagonal H matters
    h = gptq.Hessian(in_f)
    h.add(x)
    return torch.randn(out_f, in_f, generator=g).to(DEVICE), h.H.to(DEVICE)


def _codes(q, s):
    s = s.reshape(q.shape[0], -1) if s.dim() else s.reshape(1, 1)
    return (q / s.repeat_interleave(q.shape[1] // s.shape[1], 1)).round()


@pytest.mark.parametrize("scheme,block,act_order,mse", [
    (QScheme(4, symmetric=False, granularity="group", group_size=64), 128, False, False),
    (QScheme(4, symmetric=False, granularity="group", group_size=64), 128, True, False),
    (QScheme(4, symmetric=False, granularity="group", group_size=32), 96, False, True),  # groups across blocks
    (QScheme(3, granularity="group", group_size=64), 128, True, True),
    (QScheme(4, granularity="channel"), 128, False, False),
    (QScheme(8, granularity="tensor"), 64, True, False),
])
def test_kernel_matches_the_pytorch_loop(kernel, monkeypatch, scheme, block, act_order, mse):
    W, H = _problem(37, 256, seed=block + act_order)  # 37 rows: not a multiple of the row tile
    monkeypatch.setattr(gptq, "_column_kernel", lambda w: None)  # the PyTorch loop (on CUDA too)
    want = gptq.gptq_quantize(W, H, scheme, block_size=block, act_order=act_order, mse=mse)
    monkeypatch.setattr(gptq, "_column_kernel", lambda w: kernel)
    got = gptq.gptq_quantize(W, H, scheme, block_size=block, act_order=act_order, mse=mse)
    q_want, s_want, _ = want
    q_got, s_got, _ = got
    # the same operations column by column; only the rank-1 update may round differently (a fused
    # multiply-add), which can move a value sitting on a rounding boundary by one step
    assert (_codes(q_want, s_want) != _codes(q_got, s_got)).float().mean() < 2e-3
    torch.testing.assert_close(s_got, s_want, rtol=1e-5, atol=0)
    err_want = ((W - q_want) @ H @ (W - q_want).t()).trace()
    err_got = ((W - q_got) @ H @ (W - q_got).t()).trace()
    assert abs(float(err_got / err_want) - 1) < 2e-3


def test_kernel_rounds_ties_to_even_and_clamps(kernel):
    """With Hinv = I no error moves, so the kernel's output is plain fake-quant of each column:
    exact halves round to even (torch.round), values past the grid clamp."""
    rows, width = 8, 16
    s = torch.full((rows, 1), 0.25, device=DEVICE)
    z = torch.full((rows, 1), 8.0, device=DEVICE)
    steps = torch.tensor([-9.5, -8.5, -7.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5, 8.5, 100.0, -100.0, 0.0, 1.25, -2.75])
    W1 = (steps * 0.25).repeat(rows, 1).to(DEVICE)
    want = fake_quantize_prepared(W1.clone(), 1 / s, s, 0 - z, 15 - z)
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
    group_of = torch.zeros(width, dtype=torch.int32, device=DEVICE)
    original = W1.clone()
    kernel(W1, Q1, Err1, torch.eye(width, device=DEVICE), s, z, group_of, 0, width, 0, 15)
    torch.testing.assert_close(Q1, want, rtol=0, atol=0)
    torch.testing.assert_close(Err1, original - want, rtol=0, atol=0)
    torch.testing.assert_close(W1, want, rtol=0, atol=0)  # each column moved onto its grid point, nothing else
