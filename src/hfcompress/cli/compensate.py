"""``hfcompress compensate QUANTIZED_DIR --original FLOAT_DIR --rank 32 --out ADAPTER_DIR``:
EoRA (or plain SVD) compensation of a compressed model, saved as a standard PEFT LoRA adapter."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("compensate", help="EoRA low-rank compensation of a compressed model, saved as a LoRA adapter")
    p.add_argument("model", help="compressed model directory (hfcompress, bitsandbytes or pruned checkpoint)")
    p.add_argument("--original", required=True, help="the float model directory the compressed one came from")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank per layer (capped at the layer's smaller side)")
    p.add_argument("--method", default="eora", choices=["eora", "svd"],
                   help="eora: calibrated on activations; svd: plain SVD baseline, no data")
    p.add_argument("--dataset", default=None, metavar="TEXT_FILE",
                   help="eora: calibration text file (default: the bundled mixed calibration text, as GPTQ)")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_HUB_ID",
                   help="eora: tokenizer for the calibration text (default: the one saved with --original, "
                        "else with the model)")
    p.add_argument("--n-samples", type=int, default=32, help="eora: calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="eora: tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=4, help="eora: calibration windows per forward")
    p.add_argument("--window-offset", type=float, default=None,
                   help="eora: cut the calibration windows this fraction of a spacing past the windows a quantizer "
                        "calibrated on the same text with the same --n-samples / --seq-len used, in [0, 1) "
                        "(default: EoRAConfig's, 0.5: half-way between them; 0: the same windows)")
    p.add_argument("--shrinkage", type=_shrinkage, default=None,
                   help="eora: solve on (1 - SHRINKAGE)·XᵀX + SHRINKAGE·diag(XᵀX), in [0, 1] (0: the paper's "
                        "EoRA; default: EoRAConfig's, 0.5), or 'cv': chosen per layer by cross-validation "
                        "on the calibration windows")
    p.add_argument("--target-modules", nargs="*", default=None, metavar="PATTERN",
                   help="module-name patterns to compensate (default: every layer that differs from the original)")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="precision of the saved LoRA weights (PEFT computes them in fp32 after loading); "
                        "float16 is what the added bits per weight in adapter_config.json count")
    p.add_argument("--out", required=True, help="adapter output directory")
    p.set_defaults(func=run)


def _shrinkage(v: str):
    return v if v == "cv" else float(v)


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun`` / ``accelerate launch`` the ranks calibrate EoRA data parallel
    (hfcompress.distributed) and rank 0 alone writes the adapter."""
    from hfcompress import distributed

    started = distributed.init_from_env()
    try:
        return _run(args)
    finally:
        distributed.shutdown(started)


def _run(args: argparse.Namespace) -> int:
    import torch

    import hfcompress

    from .common import check_dataset_arg, load_model, load_tokenizer, model_source

    model_source(args.original, "--original")
    check_dataset_arg(args.dataset)
    tokenizer = None
    if args.method == "eora":
        try:
            tokenizer = load_tokenizer(args.tokenizer, args.original)
        except FileNotFoundError:
            tokenizer = load_tokenizer(None, args.model)
    config = hfcompress.EoRAConfig(rank=args.rank, method=args.method, dataset=args.dataset,
                                   n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                   target_modules=args.target_modules,
                                   **({} if args.shrinkage is None else {"shrinkage": args.shrinkage}),
                                   **({} if args.window_offset is None else {"window_offset": args.window_offset}))
    model = load_model(args.model, dtype=torch.float32)
    peft_model = hfcompress.compensate(model, args.original, config, tokenizer=tokenizer, progress=True,
                                       save_dtype=getattr(torch, args.save_dtype))
    from hfcompress.distributed import agree, current
    from hfcompress.hub import atomic_save

    dist = current()  # rank 0 writes; the others wait for it and share its outcome
    writer = dist is None or dist.is_writer
    # whole old or whole new adapter, whatever the base
    agree(dist, lambda: atomic_save(args.out, peft_model.save_pretrained), f"writing {args.out}", run_here=writer)
    if writer:
        print(f"saved {args.method} rank-{args.rank} LoRA adapter ({args.save_dtype}) to {args.out}")
    return 0
