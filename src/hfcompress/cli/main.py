"""``hfcompress`` console script. Each subcommand lives in its own module of this package and
exposes ``add_parser(subparsers)`` (which sets ``func``).

Errors: any exception a command raises is printed as one line (``hfcompress CMD: error: ...``)
and the exit code is 2; ``--debug`` shows the traceback instead. Help: every option says its
default."""

from __future__ import annotations

import argparse
import importlib
import sys

# one module per subcommand, in the order shown by --help
COMMANDS = ("quantize", "inspect", "verify", "push", "compensate", "eval", "demo", "convert", "export")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default
    (options whose default is None say in words what happens when they are not given)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "default" in help or action.default in (None, argparse.SUPPRESS):
            return help
        if isinstance(action.default, bool) and not action.option_strings:
            return help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: defaults in its help, and ``--debug``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress Hugging Face models.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", dest="debug_all", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name in COMMANDS:
        importlib.import_module(f"hfcompress.cli.{name}").add_parser(sub)
    return parser


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's first non-empty line (KeyError's quotes removed),
    or its type when it has no message."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return first or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"hfcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        if args.debug or args.debug_all:
            raise
        print(f"hfcompress {args.command}: error: {one_line(e)} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
