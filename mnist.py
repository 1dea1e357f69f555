"""MNIST data (IDX files from --data_dir, $QUANT_DATA_DIR or the repository's data/, checksummed;
the `ylecun/mnist` hub dataset otherwise), the 784-128-10 MLP, its seeded FP32 training with
checkpoint reuse (only of a checkpoint trained with the same settings), and batched evaluation."""
import json
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from cli import UsageError, positive_int
from paths import DATA_ENV, data_folders, hub_reachable, read_data
from results import settings_id

MEAN, STD = 0.1307, 0.3081
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(stem: str, folder_arg: str | None) -> str | None:
    for folder in data_folders(folder_arg):
        for sub in ("mnist", "MNIST/raw", ""):
            for name in (stem, stem.replace("-idx", ".idx")):
                for ext in ("", ".gz", ".xz"):
                    path = os.path.join(folder, sub, name + ext)
                    if os.path.isfile(path):
                        return path
    return None


def read_idx(path: str, magic: int, key: str) -> np.ndarray:
    """Read an IDX file (plain, .gz or .xz), checking its checksum, magic number and length."""
    raw = read_data(path, key)
    ndim = magic - 2048
    if len(raw) < 4 + 4 * ndim:
        raise UsageError(f"corrupt MNIST file {path}: only {len(raw)} bytes, too short for an IDX header")
    found, *dims = struct.unpack(f">{1 + ndim}I", raw[: 4 + 4 * ndim])
    if found != magic:
        raise UsageError(f"corrupt MNIST file {path}: magic number {found}, expected {magic}")
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise UsageError(f"corrupt or truncated MNIST file {path}: {len(raw)} bytes, the header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _normalize(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images.astype(np.float32)).reshape(len(images), -1) / 255.0 - MEAN) / STD


def mnist_paths(folder: str | None) -> dict:
    """{'train': (images path, labels path), 'test': ...}: the first folder of data_folders that
    holds each file. Raises a one-line error when a file is nowhere and the hub is unreachable;
    returns None when the hub should be used."""
    paths = {split: tuple(_find(stem, folder) for stem in stems) for split, stems in FILES.items()}
    if all(p is not None for ps in paths.values() for p in ps):
        return paths
    missing = [stem for ps, stems in zip(paths.values(), FILES.values()) for p, stem in zip(ps, stems) if p is None]
    if not hub_reachable():
        raise UsageError(
            f"MNIST not found (missing {', '.join(missing)} in {', '.join(map(os.path.abspath, data_folders(folder)))}) "
            f"and the Hugging Face hub is unreachable. The repository carries it in data/mnist/ (git checkout data), "
            f"or point --data_dir / ${DATA_ENV} at a folder holding the four IDX files (.gz or not).")
    return None


def load_mnist(folder: str | None):
    """{'train': (x, y), 'test': (x, y)}: x float (N, 784) normalized, y int64 (N,)."""
    paths = mnist_paths(folder)
    if paths is not None:
        out = {}
        for split, (img_path, lbl_path) in paths.items():
            img_stem, lbl_stem = FILES[split]
            images, labels = read_idx(img_path, 2051, f"mnist/{img_stem}"), read_idx(lbl_path, 2049, f"mnist/{lbl_stem}")
            if len(images) != len(labels):
                raise UsageError(f"MNIST {split}: {len(images)} images in {img_path} but {len(labels)} labels in {lbl_path}")
            out[split] = (_normalize(images), torch.from_numpy(labels.astype(np.int64)))
        return out
    from datasets import load_dataset
    ds = load_dataset("ylecun/mnist")
    return {split: (_normalize(np.stack([np.array(im) for im in ds[split]["image"]])),
                    torch.tensor(ds[split]["label"], dtype=torch.int64)) for split in ("train", "test")}


class MLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    return 100.0 * int((predictions(model, x, batch_size) == y).sum()) / len(x)


def scored(pred: torch.Tensor, y: torch.Tensor, fp32_pred: torch.Tensor) -> dict:
    """A row's accuracy (%), its 95 % bootstrap interval over test images, and its flips against the
    float model: the share of images whose predicted class changed (%), split into right -> wrong
    and wrong -> right ("Accuracy is Not All You Need": accuracy can stay flat while answers move)."""
    from stats import bootstrap_mean
    right, fp32_right = (pred == y).numpy(), (fp32_pred == y).numpy()
    lo, hi = bootstrap_mean(right)
    return dict(accuracy=100.0 * int(right.sum()) / len(right), acc_ci_low=100 * lo, acc_ci_high=100 * hi,
                flips=100.0 * float((pred != fp32_pred).double().mean()),
                flips_right_to_wrong=100.0 * float((fp32_right & ~right).mean()),
                flips_wrong_to_right=100.0 * float((~fp32_right & right).mean()))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          batch_size: int = 128, desc: str = "train", progress: bool = True, params=None) -> nn.Module:
    """Adam on shuffled mini-batches; the shuffling order is seeded."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size))
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        bar = tqdm(range(0, len(x), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i in bar:
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % (50 * batch_size) == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def fp32_settings(args) -> dict:
    """Everything that decides the trained FP32 weights (the checkpoint's name hashes it)."""
    return dict(arch="mlp-784-128-10", epochs=args.epochs, lr=1e-3, batch_size=128, train_subset=args.train_subset,
                seed=args.seed)


def fp32_checkpoint(models_dir: str, settings: dict) -> str:
    return os.path.join(models_dir, f"mnist_mlp_fp32_{settings_id(settings)}.pt")


def fp32_model(data, args) -> MLP:
    """The trained FP32 MLP: reused from models/ when a checkpoint made by the same training
    settings exists (unless --retrain), else trained (seeded) and, with --save_model, saved there
    with its settings beside it."""
    settings = fp32_settings(args)
    path = fp32_checkpoint(args.models_dir, settings)
    torch.manual_seed(args.seed)
    model = MLP()
    if os.path.exists(path) and not args.retrain:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise UsageError(f"cannot load FP32 checkpoint {path} ({e}); delete it or pass --retrain") from None
        print(f"reusing FP32 checkpoint {path}, trained with the same settings (pass --retrain to train again)")
        return model.eval()
    train(model, *data["train"], epochs=args.epochs, lr=settings["lr"], seed=args.seed, batch_size=settings["batch_size"],
          desc="fp32", progress=not args.no_progress)
    if args.save_model:
        os.makedirs(args.models_dir, exist_ok=True)
        with open(path[:-3] + ".json", "w") as f:
            json.dump(settings, f, indent=1)
        tmp = path + ".tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        print(f"saved FP32 checkpoint {path}")
    return model


def load_subsets(args) -> dict:
    """MNIST as the scripts use it: --train_subset / --test_subset applied (the first N images)."""
    data = load_mnist(args.data_dir)
    for split, n in (("train", args.train_subset), ("test", args.test_subset)):
        if n:
            data[split] = tuple(t[:n] for t in data[split])
    return data


def add_mnist_args(p):
    p.add_argument("--epochs", type=positive_int, default=10, help="FP32 training epochs when no checkpoint is reused (default: 10)")
    p.add_argument("--retrain", action="store_true", help="train the FP32 model even if a checkpoint exists")
    p.add_argument("--train_subset", type=positive_int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--test_subset", type=positive_int, default=None, help="evaluate on the first N test images (quick runs)")
