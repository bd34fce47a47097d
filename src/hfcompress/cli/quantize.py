"""``hfcompress quantize MODEL_DIR --method rtn --bits 4 --group-size 128 --out DIR``."""

from __future__ import annotations

import argparse

#: method name -> (config class name in hfcompress, extra CLI options it takes)
METHODS = {"rtn": "RTNConfig"}


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model directory and save it")
    p.add_argument("model", help="float model directory (or Hub id if online)")
    p.add_argument("--method", default="rtn", choices=sorted(METHODS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--no-mse-clip", action="store_true", help="RTN: plain min-max instead of the MSE clip search")
    p.add_argument("--skip", nargs="*", default=None, metavar="MODULE",
                   help="modules to keep in float (default: tied weights and lm_head)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="after saving, upload --out to this Hub repository (created if missing)")
    p.set_defaults(func=run)


def make_config(args: argparse.Namespace):
    import hfcompress

    cls = getattr(hfcompress, METHODS[args.method])
    kwargs = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, modules_to_not_convert=args.skip)
    if args.method == "rtn":
        kwargs["mse_clip"] = not args.no_mse_clip
    return cls(**kwargs)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress

    config = make_config(args)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    hfcompress.quantize_(model, config, progress=True)
    repo_id = None
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo_id = HfApi().create_repo(args.push_to_hub, exist_ok=True).repo_id  # the card's usage snippet names it
    model.save_pretrained(args.out, card_data={"repo_id": repo_id} if repo_id else None)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer is fine
    print(f"saved {config.algorithm} {config.bits}-bit model to {args.out}")
    if repo_id:
        from hfcompress.hub import push_folder

        info = push_folder(args.out, repo_id)
        print(f"pushed {args.out} to {repo_id}: {info.commit_url}")
    return 0
