"""``hfcompress inspect DIR``: format, bits per weight (overhead included), size, per-layer summary;
for a PEFT adapter directory (e.g. from ``hfcompress compensate``) its ranks, storage and what it compensates."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved (compressed) checkpoint or adapter")
    p.add_argument("path", help="checkpoint or PEFT adapter directory")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from hfcompress.inspect import describe_adapter, format_summary, summarize

    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"{args.path!r}: no such directory; pass a checkpoint or adapter directory "
                                "(written by save_pretrained or hfcompress quantize)")
    if os.path.isfile(os.path.join(args.path, "adapter_config.json")):
        print(describe_adapter(args.path))
    else:
        print(format_summary(summarize(args.path), per_layer=not args.no_layers))
    return 0
