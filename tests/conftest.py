import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (GPTQ's column loop) run in Triton's interpreter on CPU tensors; it must be
    # chosen before triton is first imported, which decorates its own helpers (tl.sum) then
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on sys.path through pyproject.toml
DATA = os.path.join(ROOT, "data")  # the repository's own data: tests need nothing beside the clone


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # the hub is unreachable here; tests must never wait on it, nor read data from outside the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for var in ("QUANT_DATA_DIR", "QUANT_SHARED_DIR", "QUANT_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised 2-block GPT-2 (the Conv1D path) with the real GPT-2 tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(DATA, "gpt2-tokenizer")).save_pretrained(folder)
    return str(folder)
