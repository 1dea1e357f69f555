"""One rank of a data-parallel quantization run, for tests/test_distributed.py: for each recipe
given as JSON, quantizes a fresh stories260K with it on real WikiText windows, scores it, and
(rank 0) saves the quantized state and the perplexity as OUT_DIR/<i>.pt. Run alone, it is the
one-process reference. Several recipes share one launch: starting the ranks is most of a run.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR RECIPE_JSON [RECIPE_JSON ...] [--fail_rank R]
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llm import calib_windows, eval_windows, evaluate, load_tokenizer, tokenize, wikitext_text  # noqa: E402
from quant import Recipe, distributed, quantize_model  # noqa: E402


def main():
    args = sys.argv[1:]
    fail_rank = None
    if "--fail_rank" in args:
        i = args.index("--fail_rank")
        fail_rank, args = int(args[i + 1]), args[:i] + args[i + 2:]
    out_dir, recipes = args[0], [Recipe.from_json(a) for a in args[1:]]
    torch.set_num_threads(1)
    distributed.init("cpu")
    if distributed.rank() == fail_rank:
        raise ValueError(f"rank {fail_rank} fails on purpose")
    folder, data = os.path.join(ROOT, "data", "stories260K"), os.path.join(ROOT, "data")
    tok = load_tokenizer(folder)
    calib = calib_windows(tokenize(tok, wikitext_text("validation", data)), 8, 64, 0)
    windows = eval_windows(tokenize(tok, wikitext_text("test", data)), 64, 12)
    for i, recipe in enumerate(recipes):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        quantize_model(model, recipe, calib.split(2), progress=False)
        with torch.no_grad():
            ev = evaluate(model, windows, 4, "cpu", progress=False)
        if distributed.is_main():
            torch.save({"state": model.state_dict(), "perplexity": ev["perplexity"], "window_nll": ev["window_nll"],
                        "world": distributed.world()}, os.path.join(out_dir, f"{i}.pt"))


if __name__ == "__main__":
    main()
