"""``hfcompress eval MODEL [--adapter DIR] [--text FILE ...]``: sliding-window perplexity (the
benchmarks' code), of a model or of a model with a PEFT adapter (e.g. an EoRA compensation)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a (compressed) model on text, sliding window")
    p.add_argument("model", help="model directory (float or hfcompress checkpoint)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT adapter directory to load on the model first (e.g. from `hfcompress compensate`)")
    p.add_argument("--text", nargs="*", default=None, metavar="FILE",
                   help="text files to score (default: the bundled evaluation domains, never used for "
                        "calibration: Hamlet, SQLite docs, Python code, dialogue; their geometric mean is printed "
                        "too)")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens the window advances by")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of each text")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args) -> int:
    import math
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress  # noqa: F401  (registers the quantizer so compressed checkpoints load)
    from hfcompress.calibration import eval_texts
    from hfcompress.evaluate import perplexity

    texts = {}
    if args.text:
        for path in args.text:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--text {path!r} is not a file")
            with open(path, encoding="utf-8") as f:
                texts[path] = f.read()
    else:
        texts = {f"bundled:{domain}": text for domain, text in eval_texts().items()}
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    if args.adapter:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise FileNotFoundError(f"--adapter {args.adapter!r} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    nlls = []
    for name, text in texts.items():
        r = perplexity(model, tokenizer, text, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                       progress=True)
        nlls.append(r.nll)
        print(f"{name}: perplexity {r.perplexity:.3f} over {r.n_tokens} tokens "
              f"(window {r.window}, stride {r.stride})")
    if len(nlls) > 1:
        print(f"geometric mean over {len(nlls)} texts: perplexity {math.exp(sum(nlls) / len(nlls)):.3f}")
    return 0
