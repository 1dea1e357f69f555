"""What the side-by-side peer benchmarks share: the float model and windows every run starts from,
and one fresh worker process per run (ours, or a peer's in its own Python environment)."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def float_copy(model_name: str, calib_samples: int, seq_len: int, seed: int, eval_samples):
    """Yields (folder, windows path, test window count): one float32 safetensors copy of the model
    (peers refuse a model read from a GGUF file, though it is dequantized to float) and the
    calibration / test windows, both in a temporary folder that is removed afterwards."""
    import torch

    from llm import calib_windows, calibration_text, eval_windows, load_model, load_tokenizer, tokenize, wikitext_text
    from quant.export import as_float_model
    tok = load_tokenizer(model_name)
    calib_text = calibration_text(None)[1]
    calib = calib_windows(tokenize(tok, calib_text), calib_samples, seq_len, seed)
    test = eval_windows(tokenize(tok, wikitext_text("test", None)), seq_len, eval_samples)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "float")
        model = load_model(model_name, "cpu")
        as_float_model(model)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        windows = os.path.join(tmp, "windows.pt")
        torch.save({"calib": calib, "test": test}, windows)
        yield folder, windows, len(test)


def run_worker(script: str, python: str, spec: dict, name: str) -> dict:
    """Runs `script --worker <spec>` in a fresh process of `python`; its last stdout line is a JSON
    object, returned. A failed run raises with the end of its stderr."""
    done = subprocess.run([python, os.path.abspath(script), "--worker", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def calibration_loader(calib, batch_size: int):
    """The calibration windows as a DataLoader of {input_ids, attention_mask} batches in their order,
    for a peer's oneshot: handed a DataLoader, llm-compressor uses it as it is (no tokenization,
    no `datasets` map, whose fingerprint pickling failed on Python 3.12 with pyarrow 26)."""
    import torch
    from torch.utils.data import DataLoader
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def device_name(device: str) -> str:
    import torch
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
