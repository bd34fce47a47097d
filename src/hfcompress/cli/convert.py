"""``hfcompress convert SRC --from gptq --out DIR``: a GPTQ checkpoint -> an hfcompress checkpoint (exact)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint of another tool into an hfcompress checkpoint (exact)")
    p.add_argument("model", help="GPTQ checkpoint directory or Hub id (AutoGPTQ / GPTQModel layout)")
    p.add_argument("--from", dest="source_format", required=True, choices=["gptq", "transformers-spqr"],
                   help="the format of MODEL (gptq: quant_method 'gptq', checkpoint_format gptq or gptq_v2; "
                        "transformers-spqr: a local transformers SpQR checkpoint, quant_method 'spqr')")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float dtype of the layers that stay float (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress

    import os

    if os.path.isdir(args.model) and os.path.realpath(args.model) == os.path.realpath(args.out):
        raise ValueError(f"--out {args.out} is the GPTQ checkpoint itself; the conversion would replace it. "
                         "Choose another --out directory")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.source_format == "transformers-spqr":
        from hfcompress.convert.spqr_transformers import import_transformers_spqr

        out = import_transformers_spqr(args.model, args.out, dtype=None if dtype == "auto" else dtype)
        print(f"converted {args.model} (transformers SpQR) to {out}")
        return 0
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                 quantization_config=hfcompress.FromGPTQConfig())
    q = model.config.quantization_config
    if not isinstance(q, hfcompress.FromGPTQConfig):
        raise ValueError(f"{args.model} is not a GPTQ checkpoint (its quantization_config is "
                         f"{getattr(q, 'quant_method', None)!r}, expected 'gptq')")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None  # a checkpoint without a tokenizer is fine
    from hfcompress.hub import atomic_save

    def write(tmp):  # model and tokenizer land together: args.out is whole old or whole new
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_save(args.out, write)
    print(f"converted {args.model} (GPTQ {q.bits}-bit, group {q.group_size}, "
          f"{'sym' if q.sym else 'asym'}, act-order {q.act_order}) to {args.out}")
    return 0
