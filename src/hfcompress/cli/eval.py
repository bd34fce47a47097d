"""``hfcompress eval MODEL [--adapter DIR] [--text FILE ...]``: sliding-window perplexity (the
benchmarks' code), of a model or of a model with a PEFT adapter (e.g. an EoRA compensation)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a (compressed) model on text, sliding window")
    p.add_argument("model", help="model directory (float or hfcompress checkpoint)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT adapter directory to load on the model first, e.g. from `hfcompress compensate` "
                        "(default: the model alone)")
    p.add_argument("--text", nargs="*", default=None, metavar="FILE",
                   help="text files to score (default: the bundled evaluation domains, never used for "
                        "calibration: Hamlet, SQLite docs, Python code, dialogue; their geometric mean is printed "
                        "too)")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens the window advances by")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the first N tokens of each text (default: all of it)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load and score in; auto: the checkpoint's own")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_HUB_ID",
                   help="tokenizer for the texts (default: the one saved with the model)")
    p.set_defaults(func=run)


def run(args) -> int:
    import math
    import os

    import torch

    from hfcompress.calibration import eval_texts
    from hfcompress.evaluate import perplexity

    from .common import load_model, load_tokenizer, model_source

    model_source(args.model)
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter {args.adapter!r} has no adapter_config.json; pass the directory "
                                "that `hfcompress compensate` or save_pretrained of a PEFT model wrote")
    texts = {}
    if args.text:
        for path in args.text:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--text {path!r} is not a file; pass text files (or omit --text for the "
                                        "bundled evaluation domains)")
            with open(path, encoding="utf-8") as f:
                texts[path] = f.read()
    else:
        texts = {f"bundled:{domain}": text for domain, text in eval_texts().items()}
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = load_model(args.model, dtype=dtype).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
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
