"""``hfcompress demo``: the main job, end to end on the real SmolLM2-135M-Instruct.

Converts the bundled GGUF to a float checkpoint (once, cached), quantizes it with GPTQ 4-bit
(streaming block by block, calibrated on the bundled Shakespeare), saves it, reloads it with a
plain ``from_pretrained``, scores perplexity before and after on two texts never used for
calibration (Hamlet; SQLite documentation), generates a sentence from both models and prints
a short report.
"""

from __future__ import annotations

import os
import time


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="GPTQ 4-bit on the real SmolLM2-135M: perplexity before/after, save, reload, generate")
    p.add_argument("--out", default="smollm2-gptq-4bit", help="where the quantized checkpoint is saved")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="64 divides SmolLM2's hidden size 576")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens scored per evaluation text")
    p.add_argument("--prompt", default="The secret to a long and happy life is")
    p.add_argument("--device", default=None, help="where blocks are calibrated (cpu, cuda)")
    p.add_argument("--model", default=None, help="another float model directory instead of SmolLM2")
    p.set_defaults(func=run)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.calibration import bundled_text
    from hfcompress.evaluate import perplexity
    from hfcompress.inspect import summarize
    from hfcompress.smollm2 import smollm2_checkpoint

    t = time.perf_counter()
    if args.model:
        print(f"[1/5] float checkpoint {args.model}")
        src = args.model
    else:
        print("[1/5] SmolLM2-135M-Instruct: float checkpoint (converted from the bundled GGUF once, then cached)")
        src = smollm2_checkpoint()
    name = os.path.basename(os.path.normpath(src)) if args.model else "SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(src)
    texts = {"Hamlet": bundled_text("eval"), "SQLite docs": bundled_text("eval_technical")}

    def scores(model):
        return {k: perplexity(model, tok, v, window=512, stride=256, max_tokens=args.eval_tokens).perplexity
                for k, v in texts.items()}

    print("[2/5] float model: perplexity and a generation")
    fmodel = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    before = scores(fmodel)
    gen_before = _generate(fmodel, tok, args.prompt)
    del fmodel

    print(f"[3/5] GPTQ {args.bits}-bit g{args.group_size}: calibrating block by block on bundled Shakespeare")
    config = hfcompress.GPTQConfig(bits=args.bits, group_size=args.group_size, n_samples=args.n_samples,
                                   seq_len=args.seq_len)
    tq = time.perf_counter()
    hfcompress.quantize(src, config, out_dir=args.out, device=args.device, progress=True, dtype=torch.float32)
    quant_s = time.perf_counter() - tq

    print(f"[4/5] reload {args.out} with a plain from_pretrained: perplexity and a generation")
    qmodel = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    after = scores(qmodel)
    gen_after = _generate(qmodel, tok, args.prompt)

    print("[5/5] report")
    summary = summarize(args.out)
    float_mb, q_mb = _size_mb(src), _size_mb(args.out)
    lines = [
        "",
        f"{name}, GPTQ {args.bits}-bit, group {args.group_size}, act-order "
        f"({args.n_samples}x{args.seq_len} calibration tokens), quantized in {quant_s:.0f}s",
        f"  size on disk: {float_mb:.1f} MB -> {q_mb:.1f} MB (embeddings and norms stay in float)",
        f"  {_bits_line(summary)}",
        f"  perplexity ({args.eval_tokens} tokens each, window 512, stride 256):",
    ]
    for k in texts:
        lines.append(f"    {k:12s} float {before[k]:8.3f}   gptq {after[k]:8.3f}   ({after[k] / before[k] - 1:+.1%})")
    lines += [f"  prompt: {args.prompt!r}", f"    float: {gen_before}", f"    gptq : {gen_after}",
              f"  saved to {args.out} (reload: AutoModelForCausalLM.from_pretrained after `import hfcompress`)",
              f"  total {time.perf_counter() - t:.0f}s"]
    print("\n".join(lines))
    return 0


def _size_mb(d: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) / 2**20


def _bits_line(summary) -> str:
    return f"bits per quantized weight (scales, zeros, g_idx included): {summary.quantized_bits_per_weight:.3f}"
