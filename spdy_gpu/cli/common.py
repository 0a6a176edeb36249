"""Arguments shared by several subcommands, parsed into the library's own types, and the
error handling of the project's scripts (bench/)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import (
    CliOption,
    LatencyBackend,
    NoDeviceError,
    backend_class,
    backend_names,
    get_backend,
)
from ..errors import SpdyError
from ..jsonio import is_special
from ..models import ModelEntry, ModelSetting, load_model
from ..options import SparsityOption, option_grid, parse_options
from ..pipeline import GAP_CHECKPOINT_SUFFIX
from ..reconstruct.database import MANIFEST
from ..timing import CHECKPOINT_SUFFIX


def positive_seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (argparse names the flag)."""
    value = float(text)         # a ValueError reads "invalid positive_seconds value: 'x'"
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_model_args(parser: argparse.ArgumentParser, exclude: bool = True) -> None:
    """--model and its setting; with `exclude`, --exclude too (not for a command that uses
    a profile as it was planned: verify, gap)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="minilm",
                       help="built-in name (minilm) or package.module:function returning "
                            "(model, example_input) (default: minilm)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="inputs per forward (default: the model's own: 1 for built-ins, "
                            "the example input's batch for a user function)")
    group.add_argument("--seq-len", type=int, default=None,
                       help="tokens per input (default: the model's own; built-ins 128, a user "
                            "function its seq_len parameter's default)")
    group.add_argument("--image-size", type=int, default=None,
                       help="CNN input side (default: the model's own; built-ins 224, a user "
                            "function its image_size parameter's default)")
    if exclude:
        group.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                           help="layer name pattern to keep dense (shell-style, repeatable), "
                                "e.g. 'conv1' or '*classifier*'")


def model_from_args(args: argparse.Namespace) -> tuple[ModelEntry, ModelSetting]:
    entry = load_model(args.model)
    return entry, entry.resolve(ModelSetting(batch_size=args.batch_size, seq_len=args.seq_len,
                                             image_size=args.image_size))


def excluded_by(args: argparse.Namespace, entry: ModelEntry) -> list[str]:
    """The model's own exclusions plus the user's."""
    return list(entry.exclude) + list(args.exclude)


GRID_DEFAULTS = {"levels": 41, "min_sparsity": 0.40, "max_sparsity": 0.99, "block": [32]}


def add_option_args(parser: argparse.ArgumentParser, default_pattern: str | None = None) -> None:
    """The option grid (--pattern, --levels, --min/--max-sparsity, --block), or --options
    instead; the grid's flags default to None so that mixing both is caught. The grid's
    family defaults to `default_pattern`, or (None) to the chosen backend's own."""
    if default_pattern is None:
        default_pattern = "the backend's own: " + ", ".join(
            f"{name} {backend_class(name).default_pattern}" for name in backend_names())
    group = parser.add_argument_group("sparsity options")
    group.add_argument("--pattern", default=None,
                       choices=["unstructured", "block", "nm", "block+nm", "unstructured+nm"],
                       help=f"option family, or families mixed per layer (default: "
                            f"{default_pattern})")
    group.add_argument("--levels", type=int, help="number of sparsity levels (41)")
    group.add_argument("--min-sparsity", type=float, help="lowest level (0.40)")
    group.add_argument("--max-sparsity", type=float, help="highest level (0.99)")
    group.add_argument("--block", type=int, nargs="+", metavar="SIDE",
                       help="square block size(s): levels for each (32)")
    group.add_argument("--options", nargs="+", metavar="OPTION", default=None,
                       help="explicit option list instead of a grid, e.g. dense "
                            "unstructured@0.5 block64x64@0.75 nm2:4")


def options_from_args(args: argparse.Namespace, default_pattern: str) -> list[SparsityOption]:
    grid = {key: getattr(args, key) for key in ("pattern", *GRID_DEFAULTS)}
    if args.options:
        given = [f"--{key.replace('_', '-')}" for key, value in grid.items() if value is not None]
        if given:
            raise SpdyError(f"--options lists the options itself, so {', '.join(given)} would "
                            "be ignored; drop one or the other")
        return parse_options(args.options)
    values = {key: GRID_DEFAULTS[key] if grid[key] is None else grid[key] for key in GRID_DEFAULTS}
    pattern = args.pattern or default_pattern
    if args.block is not None and "block" not in pattern.split("+"):
        raise SpdyError(f"--block sets the block family's blocks, and the grid is {pattern}, "
                        "which would ignore it; add --pattern block (or block+nm), or drop "
                        "--block")
    return option_grid(pattern, values["levels"],
                       values["min_sparsity"], values["max_sparsity"], values["block"])


def add_backend_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--backend plus every backend's own options (each flag once; its help names the
    backends that take it). Options default to None: the chosen backend's own default."""
    group = parser.add_argument_group("backend")
    classes = {name: backend_class(name) for name in backend_names()}
    group.add_argument("--backend", required=required, choices=list(classes),
                       help="; ".join(f"{name}: {cls.summary}" for name, cls in classes.items()))
    users: dict[str, list[tuple[str, CliOption]]] = {}
    for name, cls in classes.items():
        for option in cls.cli_options:
            users.setdefault(option.flag, []).append((name, option))
    for flag, pairs in users.items():
        first = pairs[0][1]
        helps = "; ".join(f"{name}: {option.help}" for name, option in pairs)
        if first.type is None:
            group.add_argument(flag, action="store_const", const=True, default=None, help=helps)
        else:
            group.add_argument(flag, type=first.type, choices=first.choices,
                               metavar=first.metavar, default=None, help=helps)


def backend_config(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen backend's keyword configuration: the options it declares that were given.
    An option only other backends take is refused: it would be silently ignored."""
    options = backend_class(args.backend).cli_options
    own = {o.key for o in options}
    for name in backend_names():
        for other in backend_class(name).cli_options:
            if other.key not in own and getattr(args, other.key, None) is not None:
                raise SpdyError(f"{other.flag} is an option of --backend {name}, not of "
                                f"{args.backend}; drop it")
    return {o.key: value for o in options if (value := getattr(args, o.key, None)) is not None}


def backend_from_args(args: argparse.Namespace, *, for_latency: bool = False) -> LatencyBackend:
    """The backend named by --backend, configured by its options. for_latency: the caller
    wants end-to-end latency, so a missing device is reported as such (not with the ways to
    plan without it)."""
    if getattr(args, "backend", None) is None:
        raise SpdyError(f"no latency backend chosen; pass --backend ({', '.join(backend_names())})")
    try:
        return get_backend(args.backend, **backend_config(args))
    except NoDeviceError as e:
        if for_latency:
            raise SpdyError(e.latency) from None
        raise


def run_script(main: Callable[[], int | None]) -> None:
    """Run a script's `main` and exit with its status; bad input (SpdyError) ends in one line
    `SCRIPT: error: ...` and status 2, as the CLI's commands do."""
    try:
        code = main()
    except SpdyError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


INPUT_FILES = ("profile", "timings", "weights", "errors", "calib")    # options naming inputs
SIDE_FILES = {"timings": CHECKPOINT_SUFFIX, "gap": GAP_CHECKPOINT_SUFFIX}  # beside --out


def refuse_clobbering(args: argparse.Namespace) -> None:
    """An output (--out, --plot) may not be one of the command's input files nor the other
    output, and a run's --database may not be its --out directory or lie inside it (but as
    its default, OUT/database): each would be overwritten silently, or the command would
    lock itself out."""
    real = os.path.realpath
    # A device such as /dev/null is written through, never replaced: any output may go there.
    outputs = {f"--{k}": path for k in ("out", "plot")
               if (path := getattr(args, k, None)) and not is_special(Path(real(path)))}
    if "--out" in outputs and args.command in SIDE_FILES:
        outputs["--out's progress file"] = f"{outputs['--out']}{SIDE_FILES[args.command]}"
    inputs = {}
    for key in INPUT_FILES:
        given = getattr(args, key, None)
        for path in given if isinstance(given, list) else [given]:
            if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                inputs.setdefault(real(path), (f"--{key}", path))
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if real(path) in inputs:
            given, _ = inputs[real(path)]
            raise SpdyError(f"{flag} {path} is also the {given} input, which it would "
                            "overwrite; write to another path")
        if real(path) in seen:
            raise SpdyError(f"{flag} {path} is also the {seen[real(path)]} output; give each "
                            "output its own path")
        seen[real(path)] = flag
    database, out = getattr(args, "database", None), getattr(args, "out", None)
    reads = args.command not in ("run", "compare", "database")
    if database and reads and (Path(database) / MANIFEST).is_file():     # a database it reads
        inside = next((flag for flag, path in outputs.items()
                       if real(path).startswith(real(database) + os.sep)), None)
        if inside is not None:
            raise SpdyError(f"{inside} {outputs[inside]} lies inside the --database "
                            f"{database} it reads; write outside it")
    if args.command in ("run", "compare") and database and out:
        db, run_dir = real(database), real(out)
        inside = db.startswith(run_dir + os.sep) and db != os.path.join(run_dir, "database")
        if db == run_dir or inside:
            raise SpdyError(f"--database {database} is or lies inside the --out directory "
                            f"{out}, which the {args.command} writes; choose a "
                            f"database directory outside it (or leave --database out: "
                            f"{out}/database)")
