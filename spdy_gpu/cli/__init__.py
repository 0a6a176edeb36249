"""The `spdy-gpu` command line: one module per subcommand in this package, each defining
`add_parser(subparsers)` that registers its parser and sets `run` as the default."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import select
import sys
import traceback

from ..errors import SpdyError, first_line
from .common import refuse_clobbering

DEBUG_HELP = "on an error, also print the full traceback (with the original cause)"
RESUMABLE = ("timings", "database", "gap", "run", "compare")   # keep their progress on disk


class _StoreOnce(argparse._StoreAction):
    """An option of one value (or one list) given twice is refused: argparse would keep
    the last silently (`--timings a.json --timings b.json` solving b alone)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault("_options_given", set())
        if option_string is not None and self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} given twice; give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the command and --help, as every other error is
    (argparse prints the whole usage block first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spdy-gpu",
        description="Prune a network to a guaranteed speedup on its inference backend (SPDY).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    for command in subparsers.choices.values():     # also after the command: CMD ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:                 # named by the command's parser, whose options they missed
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # Our own progress at INFO; libraries (gensim, transformers...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spdy_gpu").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        refuse_clobbering(args)
        code = args.run(args) or 0
        sys.stdout.flush()              # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError as e:
        if not _stdout_closed():
            return _internal_error(args, e)
        return _quiet_exit()
    except SpdyError as e:
        if args.debug:
            print_traceback(e)
        print(f"spdy-gpu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = ("run the same command again to resume" if args.command in RESUMABLE
                 else "its output was not written; run it again to start over")
        print(f"spdy-gpu {args.command}: interrupted; {again}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours (or of a library): say so in one line
        return _internal_error(args, e)


def _internal_error(args: argparse.Namespace, error: BaseException) -> int:
    if args.debug:
        print_traceback(error)
    print(f"spdy-gpu {args.command}: internal error: {type(error).__name__}: "
          f"{first_line(error)}{'' if args.debug else ' (rerun with --debug for the traceback)'}",
          file=sys.stderr)
    return 1


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`spdy-gpu solve | head`), not some
    other pipe of ours that broke: polling a pipe with no reader reports an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except AttributeError:          # no poll() on this platform: trust the error
        return True
    except (OSError, ValueError):   # stdout has no descriptor (replaced by an object)
        return False


def _quiet_exit() -> int:
    """End as a command killed by SIGPIPE does (status 128 + 13), with no message: the
    reader wanted no more. Stdout goes to devnull so the interpreter's last flush cannot
    fail again (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):     # stdout replaced by an object without a descriptor
        pass
    return 141


def print_traceback(error: BaseException) -> None:
    """The traceback of `error` with every exception it came from, also those a one-line
    message hid with `raise ... from None` (the user's own code failing, for instance)."""
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__suppress_context__ = False
        cause = cause.__cause__ or cause.__context__
    traceback.print_exception(error, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
