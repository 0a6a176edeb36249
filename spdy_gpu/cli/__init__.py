"""The `spdy-gpu` command line: one module per subcommand in this package, each defining
`add_parser(subparsers)` that registers its parser and sets `run` as the default."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..errors import SpdyError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spdy-gpu",
        description="Prune a network to a guaranteed speedup on its inference backend (SPDY).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; libraries (gensim, transformers...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spdy_gpu").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.run(args) or 0
    except SpdyError as e:
        print(f"spdy-gpu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spdy-gpu {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
