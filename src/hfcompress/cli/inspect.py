"""``hfcompress inspect DIR``: format, bits per weight (overhead included), size, per-layer summary."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved (compressed) checkpoint")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    p.set_defaults(func=run)


def run(args) -> int:
    from hfcompress.inspect import format_summary, summarize

    print(format_summary(summarize(args.path), per_layer=not args.no_layers))
    return 0
