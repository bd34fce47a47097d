"""Compacter / Compacter++ trainable-parameter counts on full-size configs (no weights: meta device).

The paper reports 0.047% (Compacter++) and 0.07% (Compacter) for T5-base; its counts include the
layer norms it also trains. This counts our adapters on T5-base and BERT-base configs, checks
them against the formula, and reports the percentages with and without layer norms.

    python benchmarks/compacter_params.py     # writes benchmarks/results/compacter_params.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

import hfcompress
from hfcompress.adapters.compacter import CompacterWrapper

PAPER = {"pfeiffer": 0.047, "houlsby": 0.07}  # % of T5-base, Table 1 of the paper


def main():
    with torch.device("meta"):
        models = {
            "t5-base": lambda: T5ForConditionalGeneration(T5Config(d_model=768, d_ff=3072, num_layers=12,
                                                                   num_heads=12, d_kv=64)),
            "bert-base": lambda: BertModel(BertConfig()),
        }
        rows = []
        for name, build in models.items():
            for placement in ("pfeiffer", "houlsby"):
                base = build()
                total = sum(p.numel() for p in base.parameters())
                norms = sum(p.numel() for n, p in base.named_parameters() if "layer_norm" in n or "LayerNorm" in n)
                config = hfcompress.CompacterConfig(placement=placement)
                model = get_peft_model(base, config)
                sizes = [m.out_features for m in model.modules() if isinstance(m, CompacterWrapper)]
                trainable, _ = model.get_nb_trainable_parameters()
                assert trainable == config.num_parameters(sizes)
                rows.append({"model": name, "method": "compacter++" if placement == "pfeiffer" else "compacter",
                             "adapters": len(sizes), "adapter_params": trainable, "layer_norm_params": norms,
                             "model_params": total, "pct_adapters": 100 * trainable / total,
                             "pct_with_layer_norms": 100 * (trainable + norms) / total,
                             "paper_pct_t5_base": PAPER[placement]})
    out = Path(__file__).parent / "results" / "compacter_params.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print("| model | method | adapters | adapter params | % of model | % with layer norms | paper (T5-base) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['adapters']} | {r['adapter_params']:,} | {r['pct_adapters']:.4f}% "
              f"| {r['pct_with_layer_norms']:.4f}% | {r['paper_pct_t5_base']}% |")


if __name__ == "__main__":
    main()
