"""Data parallelism for calibration and evaluation with torch.distributed.

Under `torchrun --nproc_per_node N` every rank holds the whole model and every N-th calibration
batch and test window (rank r: r, r + N, ...). What calibration accumulates is reduced so that N
ranks compute what one process computes, up to the order of float sums:

  GPTQ         each layer group's Hessian: the sums of x x^T (and GPTAQ's (x_float - x) x^T) and
               the token count, summed; the group's solve runs on one rank, chosen in turn, and its
               quantized weights, scales and zero points are broadcast from there
  min-max      static activation ranges (MIN and MAX)
  SmoothQuant  each input channel's largest magnitude (MAX)
  AWQ          each layer's row sample gathered in batch order (the rows one process would keep),
               then the same search on every rank
  evaluation   NLL sums and token counts (SUM); per-window values gathered in window order

Statistics that cannot be reduced exactly this way (histogram observers, whose bins follow the
data each rank saw; SignRound's training steps) are refused under several ranks with the reason
(`check_recipe`).
Without torchrun (one process) every function here is the identity.
"""
import os

import torch
import torch.distributed as dist

REDUCIBLE_OBSERVERS = ("minmax",)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """The rank that writes rows, artefacts and messages."""
    return rank() == 0


def init(device: str) -> str:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and return this rank's
    device (cuda:LOCAL_RANK for cuda). Without torchrun, the device unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shard(items: list) -> list:
    """This rank's share: items rank, rank + world, ..."""
    return list(items)[rank()::world()]


def shard_batches(batches: list) -> list:
    """This rank's calibration batches; ValueError if some rank would get none."""
    if len(batches) < world():
        raise ValueError(f"{len(batches)} calibration batches for {world()} ranks: each rank needs one")
    return shard(batches)


def _op(how: str):
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[how]


def all_reduce_(t: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """t reduced over the ranks, in place (every rank gets the same bits)."""
    if world() > 1:
        dist.all_reduce(t, op=_op(how))
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    if world() > 1:
        dist.broadcast(t, src)
    return t


def total(x: float) -> float:
    """A number summed over the ranks (float64)."""
    if world() == 1:
        return x
    return float(all_reduce_(torch.tensor([x], dtype=torch.float64, device=_comm_device())).item())


def gather_windows(values: list) -> list:
    """Per-window (or per-batch) values, one per item of this rank's shard, gathered on every rank
    in the global order (the inverse of `shard`)."""
    if world() == 1:
        return list(values)
    parts = [None] * world()
    dist.all_gather_object(parts, list(values))
    out = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_recipe(recipe) -> None:
    """ValueError naming what in `recipe` is not reduced exactly across ranks (several ranks only)."""
    if world() == 1:
        return
    if recipe.method == "signround":
        raise ValueError("signround is not data-parallel here (its training steps would differ from one process's): "
                         "run it in one process")
    if recipe.act == "static" and recipe.a_observer not in REDUCIBLE_OBSERVERS:
        raise ValueError(f"the {recipe.a_observer} observer's histogram follows the data each rank saw and is not "
                         f"reduced exactly: use {' / '.join(REDUCIBLE_OBSERVERS)} or one process")
