"""Perplexity of an exported GGUF file under llama.cpp itself (through llama-cpp-python), on the
WikiText-2 test windows that ptq_llm.py scores, so that its number sits beside the row's
`perplexity` (our model) and `export_perplexity` (transformers' GGUF loader).

    pip install llama-cpp-python    # builds llama.cpp from source (about 15 minutes on 2 cores)
    python bench/llamacpp.py models/ptq_llm/<name>-q4_0.gguf --model_name stories260K --seq_len 256 --eval_samples 40

Token ids go in as they are (the source model's tokenizer makes them, as in ptq_llm.py), so the
comparison is of the weights and the arithmetic, not of two tokenizers. llama.cpp computes
Q4_0 / Q8_0 dot products against its own 8-bit quantization of the activations, so a small
difference from the dequantizing loaders is expected.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import UsageError, positive_int, run  # noqa: E402
from llm import eval_windows, load_tokenizer, tokenize, wikitext_text  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="the GGUF file")
    p.add_argument("--model_name", required=True, help="the model it was made from (its tokenizer makes the windows)")
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--eval_samples", type=positive_int, default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count())
    args = p.parse_args(argv)
    if not os.path.isfile(args.gguf):
        raise UsageError(f"no such file: {args.gguf}")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UsageError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
    from tqdm.auto import tqdm
    windows = eval_windows(tokenize(load_tokenizer(args.model_name), wikitext_text("test", args.data_dir)),
                           args.seq_len, args.eval_samples)
    llm = Llama(model_path=args.gguf, n_ctx=args.seq_len, logits_all=True, verbose=False, n_threads=args.threads)
    nll, count = 0.0, 0
    for w in tqdm(windows.tolist(), desc="llama.cpp", leave=False):
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(w)], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
    ppl = float(np.exp(nll / count))
    print(f"llama.cpp perplexity {ppl:.4f} on {len(windows)} windows x {args.seq_len} ({args.gguf})")
    llm.close()  # (freed now: at interpreter exit llama-cpp-python's destructor finds its library gone)
    return ppl


if __name__ == "__main__":
    run(main)
