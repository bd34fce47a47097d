"""``hfcompress demo``: the main job, end to end on the real SmolLM2-135M-Instruct.

Converts the bundled GGUF to a float checkpoint (once, cached), quantizes it with GPTQ 4-bit
(streaming block by block, calibrated on the bundled default calibration text), saves it, reloads it with a
plain ``from_pretrained``, scores perplexity before and after on every evaluation domain (texts
never used for calibration) and their geometric mean, generates a sentence from both models and prints
a short report: sizes on disk, decode tokens/s of both, and the wall and CPU time of every phase.

The model keeps its own dtype end to end (SmolLM2 is bfloat16): it is scored, quantized, saved
and reloaded in bf16, so the reloaded 4-bit layers decode on the native CPU int4 matmul.
"""

from __future__ import annotations

import contextlib
import os
import time


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="GPTQ 4-bit on the real SmolLM2-135M: perplexity before/after, save, reload, "
                                    "generate, timed")
    p.add_argument("--out", default="smollm2-gptq-4bit", help="where the quantized checkpoint is saved")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="bits per weight")
    p.add_argument("--group-size", type=int, default=64, help="input channels per scale (64 divides SmolLM2's 576)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens scored per evaluation text")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated (and timed) per model")
    p.add_argument("--prompt", default="The secret to a long and happy life is", help="generation prompt")
    p.add_argument("--device", default=None, help="where blocks are calibrated (cpu, cuda; default: cpu)")
    p.add_argument("--model", default=None, help="another float model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or Hub id (default: the one saved with the model)")
    p.set_defaults(func=run)


class _Clock:
    """Wall and process CPU seconds of each named phase (CPU time counts every thread)."""

    def __init__(self):
        self.phases: list[tuple[str, float, float]] = []
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t, c = time.perf_counter(), time.process_time()
        yield
        self.phases.append((name, time.perf_counter() - t, time.process_time() - c))

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, time.process_time() - self.c0


def _generate(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` (exactly ``new_tokens`` tokens) and its decode tokens/s
    (after a 2-token warm-up, so one-time work such as the CPU int4 repack is not counted)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        seconds = time.perf_counter() - t
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
    return text, new_tokens / seconds


def measure(args) -> dict:
    """Run the demo; its measurements as a dict (see :func:`report`)."""
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.calibration import eval_texts
    from hfcompress.evaluate import perplexity
    from hfcompress.inspect import summarize
    from hfcompress.smollm2 import smollm2_checkpoint

    from .common import load_tokenizer, model_source

    clock = _Clock()
    load_start = os.getloadavg()
    with clock("float checkpoint"):
        if args.model:
            print(f"[1/5] float checkpoint {args.model}")
            src = model_source(args.model, "--model")
        else:
            print("[1/5] SmolLM2-135M-Instruct: float checkpoint (converted from the bundled GGUF once, then cached)")
            src = smollm2_checkpoint()
        tok = load_tokenizer(args.tokenizer, src)
    name = os.path.basename(os.path.normpath(src)) if args.model else "SmolLM2-135M-Instruct"
    texts = eval_texts()

    def scores(model):
        return {k: perplexity(model, tok, v, window=512, stride=256, max_tokens=args.eval_tokens).perplexity
                for k, v in texts.items()}

    print("[2/5] float model in its own dtype: perplexity and a timed generation")
    with clock("float: load"):
        fmodel = AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    dtype = fmodel.dtype
    with clock("float: perplexity"):
        before = scores(fmodel)
    with clock("float: generate"):
        gen_before, tps_before = _generate(fmodel, tok, args.prompt, args.new_tokens)
    del fmodel

    print(f"[3/5] GPTQ {args.bits}-bit g{args.group_size}: calibrating block by block on the bundled mixed calibration text")
    config = hfcompress.GPTQConfig(bits=args.bits, group_size=args.group_size, n_samples=args.n_samples,
                                   seq_len=args.seq_len)
    with clock("quantize (GPTQ, streamed)"):
        hfcompress.quantize(src, config, tokenizer=tok, out_dir=args.out, device=args.device, progress=True,
                            dtype=dtype)

    print(f"[4/5] reload {args.out} with a plain from_pretrained ({str(dtype).removeprefix('torch.')}): "
          "perplexity and a timed generation")
    with clock("quantized: load"):
        qmodel = AutoModelForCausalLM.from_pretrained(args.out, dtype="auto").eval()
    with clock("quantized: perplexity"):
        after = scores(qmodel)
    with clock("quantized: generate"):
        gen_after, tps_after = _generate(qmodel, tok, args.prompt, args.new_tokens)

    summary = summarize(args.out)
    wall, cpu = clock.total()
    return {
        "model": name, "dtype": str(dtype).removeprefix("torch."), "bits": args.bits, "group_size": args.group_size,
        "zero_point": config.zero_point, "static_groups": config.static_groups,
        "calibration": f"{args.n_samples}x{args.seq_len}", "eval_tokens": args.eval_tokens, "out": args.out,
        "original_bytes": _size_bytes(src), "checkpoint_bytes": _size_bytes(args.out),
        "bits_per_weight": summary.quantized_bits_per_weight,
        "perplexity_float": before, "perplexity_gptq": after,
        "tokens_per_s_float": tps_before, "tokens_per_s_gptq": tps_after, "new_tokens": args.new_tokens,
        "prompt": args.prompt, "generation_float": gen_before, "generation_gptq": gen_after,
        "phases": [{"phase": n, "wall_s": w, "cpu_s": c} for n, w, c in clock.phases],
        "total_wall_s": wall, "total_cpu_s": cpu, "cpus": os.cpu_count(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
    }


def report(r: dict) -> str:
    """The printed report of :func:`measure`'s results."""
    dt, fb, qb = r["dtype"], r["original_bytes"], r["checkpoint_bytes"]
    before, after = r["perplexity_float"], r["perplexity_gptq"]
    lines = [
        "",
        f"{r['model']} ({dt}), GPTQ {r['bits']}-bit, group {r['group_size']}, {grid(r)} "
        f"({r['calibration']} calibration tokens)",
        f"  size on disk: original {_mib(fb)} ({dt}) -> {_mib(qb)} = {qb / 1e6:.1f} MB "
        f"({qb / fb:.1%}; embeddings and norms stay in {dt})",
        f"  bits per quantized weight (scales, zeros, g_idx included): {r['bits_per_weight']:.3f}",
        f"  perplexity ({r['eval_tokens']} tokens each, window 512, stride 256):",
    ]
    for k in before:
        lines.append(f"    {k:14s} float {before[k]:8.3f}   gptq {after[k]:8.3f}   ({after[k] / before[k] - 1:+.1%})")
    gb, ga = _geomean(before.values()), _geomean(after.values())
    lines.append(f"    {'geometric mean':14s} float {gb:8.3f}   gptq {ga:8.3f}   ({ga / gb - 1:+.1%})")
    tf, tq = r["tokens_per_s_float"], r["tokens_per_s_gptq"]
    lines += [
        f"  decode, batch 1, {r['new_tokens']} greedy tokens: float {tf:.1f} tokens/s, gptq {tq:.1f} tokens/s "
        f"({tq / tf:.2f}x)",
        f"  prompt: {r['prompt']!r}", f"    float: {r['generation_float']}", f"    gptq : {r['generation_gptq']}",
        f"  saved to {r['out']} (reload: AutoModelForCausalLM.from_pretrained after `import hfcompress`)",
        "  time per phase (wall / process CPU, seconds):",
    ]
    lines += [f"    {p['phase']:28s} {p['wall_s']:7.1f} / {p['cpu_s']:7.1f}" for p in r["phases"]]
    lines += [f"    {'total':28s} {r['total_wall_s']:7.1f} / {r['total_cpu_s']:7.1f}",
              f"  {r['cpus']} CPUs; load average (1/5/15 min) at start "
              f"{'/'.join(f'{x:.1f}' for x in r['loadavg_start'])}, at end "
              f"{'/'.join(f'{x:.1f}' for x in r['loadavg_end'])}"]
    return "\n".join(lines)


def grid(r: dict) -> str:
    """How the demo's GPTQ grid was stored (results from before these fields: g_idx groups, integer zeros)."""
    groups = "static groups (no g_idx)" if r.get("static_groups", False) else "g_idx groups"
    return f"act-order, {groups}, {'float' if r.get('zero_point', 'int') == 'float' else 'integer'} zero points"


def run(args) -> int:
    r = measure(args)
    print("[5/5] report")
    print(report(r))
    return 0


def _geomean(values) -> float:
    import math

    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _size_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
