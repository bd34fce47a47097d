"""``hfcompress quantize MODEL --method rtn|gptq --bits 4 --group-size 128 --out DIR``."""

from __future__ import annotations

import argparse

#: method name -> config class name in hfcompress
METHODS = {"rtn": "RTNConfig", "gptq": "GPTQConfig"}


def _plugin_methods() -> dict:
    """Registered algorithms that bring their own CLI options (``add_cli_arguments`` / ``cli_kwargs``)."""
    from hfcompress.config import algorithms

    return {name: cls for name, cls in algorithms().items()
            if name not in METHODS and hasattr(cls, "add_cli_arguments")}


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model directory and save it")
    p.add_argument("model", help="float model directory, or a Hub repo id when online")
    p.add_argument("--method", default=None, choices=sorted(set(METHODS) | set(_plugin_methods())),
                   help="rtn: data-free; gptq (and plug-ins such as spqr): calibrated (default: rtn; evopress "
                        "when --target-size or --target-bits-per-weight is given)")
    p.add_argument("--bits", type=int, default=None, help="bits per weight code, 2, 3, 4 or 8 (default: 4; spqr: 3)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale; a multiple of 8, or -1 for one group per output channel "
                        "(default: 128; spqr: 16)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero points)")
    p.add_argument("--mse-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="search each group's grid (scale, zero point) for the least squared error, "
                        "Hessian-weighted in GPTQ (default: the method's own: off for RTN, on for GPTQ)")
    p.add_argument("--zero-point", default=None, choices=["int", "float"],
                   help="rtn / gptq: how asymmetric zero points are stored: float (one fp16 per group, +12 bits per "
                        "group; the default) or int (packed integers; needed for compressed-tensors export)")
    p.add_argument("--skip", nargs="*", default=None, metavar="MODULE",
                   help="modules to keep in float (default: tied weights and lm_head)")
    g = p.add_argument_group("gptq (calibration; progress bar shows blocks done and ETA)")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in natural order")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: act-order with natural groups, no g_idx stored (default: on; --no-static-groups "
                        "groups columns in act-order and stores g_idx)")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian dampening, fraction of mean diag")
    g.add_argument("--dataset", default=None, metavar="TEXT_FILE",
                   help="GPTQ: calibration text file, or wikitext2 / c4 when the datasets library has them cached "
                        "(default: the bundled mixed calibration text: Shakespeare, Node.js docs, Rust release notes)")
    g.add_argument("--tokenizer", default=None, metavar="DIR_OR_HUB_ID",
                   help="GPTQ: tokenizer for the calibration text (default: the one saved with the model)")
    g.add_argument("--n-samples", type=int, default=128, help="GPTQ: calibration windows")
    g.add_argument("--seq-len", type=int, default=512, help="GPTQ: tokens per calibration window")
    g.add_argument("--device", default=None, help="GPTQ: where each block is calibrated, cpu or cuda (default: cpu)")
    g.add_argument("--stream", action="store_true",
                   help="GPTQ: stream blocks from the safetensors shards (models larger than memory)")
    for name, cls in sorted(_plugin_methods().items()):
        cls.add_cli_arguments(p.add_argument_group(f"{name} (calibration)"))
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load and quantize in; auto: the checkpoint's own")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="after saving, upload --out to this Hub repository, created if missing (default: no upload)")
    p.set_defaults(func=run)


def make_config(args: argparse.Namespace):
    import hfcompress

    if args.method is None:  # a size budget means: compress to that size
        budget = getattr(args, "target_size", None) is not None or getattr(args, "target_bits_per_weight", None)
        args.method = "evopress" if budget else "rtn"
    plugins = _plugin_methods()
    if args.method in plugins:
        cls = plugins[args.method]
        kwargs = dict(modules_to_not_convert=args.skip, **cls.cli_kwargs(args))
        if getattr(args, "zero_point", None) is not None:  # (a format without float zeros says so)
            kwargs["zero_point"] = args.zero_point
        kwargs.update({k: v for k, v in (("bits", args.bits), ("group_size", args.group_size)) if v is not None})
        return cls(**kwargs)
    cls = getattr(hfcompress, METHODS[args.method])
    kwargs = dict(bits=4 if args.bits is None else args.bits, group_size=128 if args.group_size is None else
                  args.group_size, sym=args.sym, modules_to_not_convert=args.skip)
    if args.mse_clip is not None:
        kwargs["mse_clip"] = args.mse_clip
    if getattr(args, "zero_point", None) is not None:
        kwargs["zero_point"] = args.zero_point
    if args.method == "gptq":
        kwargs.update(act_order=not args.no_act_order, damp=args.damp, dataset=args.dataset,
                      n_samples=args.n_samples, seq_len=args.seq_len)
        if args.static_groups is not None:
            kwargs["static_groups"] = args.static_groups
    else:
        given = [f"--{n.replace('_', '-')}" for n in ("dataset", "tokenizer", "stream", "no_act_order")
                 if getattr(args, n)]
        if args.static_groups is not None:
            given.append("--static-groups" if args.static_groups else "--no-static-groups")
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --method gptq (rtn is data-free); drop them or "
                             "add --method gptq")
    return cls(**kwargs)


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the ranks calibrate data parallel
    (hfcompress.distributed) and rank 0 alone writes, prints and pushes."""
    from hfcompress import distributed

    args.device = distributed.rank_device(args.device)
    started = distributed.init_from_env(args.device)
    try:
        return _run(args)
    finally:
        distributed.shutdown(started)


def _run(args: argparse.Namespace) -> int:
    import os

    import torch

    import hfcompress

    from .common import check_dataset_arg, load_model, load_tokenizer, model_source

    from hfcompress.distributed import current

    config = make_config(args)
    dist = current()
    writer = dist is None or dist.is_writer
    ranks = f", {dist.world} processes" if dist is not None else ""
    model_source(args.model)
    check_dataset_arg(args.dataset)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = None if config.data_free else load_tokenizer(args.tokenizer, args.model)
    if args.stream:
        if config.data_free:
            raise ValueError(f"--stream is for calibration methods (--method gptq ...), not {args.method}")
        if args.push_to_hub:
            raise ValueError("--stream does not push; run `hfcompress push` on the output directory")
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"--stream reads safetensors shards from a local directory; {args.model!r} is "
                                    "not one (download it first, e.g. `hf download REPO --local-dir DIR`)")
        hfcompress.quantize(args.model, config, tokenizer=tokenizer, out_dir=args.out, device=args.device,
                            progress=True, dtype=None if dtype == "auto" else dtype)
        if writer:
            print(f"saved {config.algorithm} {config.bits}-bit model to {args.out} (streamed block by block{ranks})")
        return 0
    model = load_model(args.model, dtype=dtype)
    calib = {"tokenizer": tokenizer, **({"device": args.device} if args.device else {})}
    hfcompress.quantize_(model, config, progress=True, **({} if config.data_free else calib))
    if dist is not None:  # rank 0 writes (and pushes); the others wait for it and share its outcome
        from hfcompress.distributed import agree

        agree(dist, lambda: _save(args, model, tokenizer, config), f"writing {args.out}", run_here=writer)
        return 0
    return _save(args, model, tokenizer, config)


def _save(args, model, tokenizer, config) -> int:
    from .common import load_tokenizer

    repo_id = None
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo_id = HfApi().create_repo(args.push_to_hub, exist_ok=True).repo_id  # the card's usage snippet names it
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(None, args.model)
        except FileNotFoundError:
            pass  # RTN: a model directory without a tokenizer is fine
    from hfcompress.hub import atomic_save

    def write(tmp):  # model and tokenizer land together: args.out is whole old or whole new
        model.save_pretrained(tmp, card_data={"repo_id": repo_id} if repo_id else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        getattr(config, "write_extra_files", lambda d: None)(tmp)  # e.g. EvoPress's search log

    atomic_save(args.out, write)
    print(f"saved {config.algorithm} {config.bits}-bit model to {args.out}")
    if repo_id:
        from hfcompress.hub import push_folder

        info = push_folder(args.out, repo_id)
        print(f"pushed {args.out} to {repo_id}: {info.commit_url}")
    return 0
