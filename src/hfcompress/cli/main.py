"""``hfcompress`` console script. Each subcommand lives in its own module of this package and
exposes ``add_parser(subparsers)`` (which sets ``func``)."""

from __future__ import annotations

import argparse
import importlib
import sys

# one module per subcommand, in the order shown by --help
COMMANDS = ("quantize", "inspect", "push", "compensate", "eval", "demo", "convert", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"hfcompress.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"hfcompress {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
