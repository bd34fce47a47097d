"""``hfcompress export DIR --to compressed-tensors --out OUT``: an hfcompress checkpoint in the
format vLLM serves (compressed-tensors pack-quantized), with the same weights."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write an hfcompress checkpoint in another tool's format (exact)")
    p.add_argument("model", help="hfcompress checkpoint directory (int_group format; spqr for transformers-spqr)")
    p.add_argument("--to", dest="target_format", required=True, choices=["compressed-tensors", "transformers-spqr"],
                   help="compressed-tensors: pack-quantized, read by vLLM and transformers; transformers-spqr: "
                        "transformers' own SpQR format (quant_method 'spqr', spqr_quant kernels, CUDA, fp16)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.target_format == "transformers-spqr":
        from hfcompress.convert.spqr_transformers import export_transformers_spqr

        out = export_transformers_spqr(args.model, args.out)
        print(f"exported {args.model} to {out} (transformers SpQR, quant_method 'spqr')")
        return 0
    from hfcompress.convert import export_compressed_tensors

    out = export_compressed_tensors(args.model, args.out)
    print(f"exported {args.model} to {out} (compressed-tensors pack-quantized)")
    return 0
