"""User-facing errors: each carries a one-line message naming the problem and the fix."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SpdyError(ValueError):
    """Bad input or an impossible request. The CLI prints the message and exits with 2."""


class InfeasibleTargetError(SpdyError):
    """No choice of options meets the latency budget."""

    def __init__(self, message: str, min_time: float, max_speedup: float | None = None):
        super().__init__(message)
        self.min_time = min_time
        self.max_speedup = max_speedup


class MissingDependencyError(SpdyError):
    """An optional dependency (a backend's runtime) is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"{package} is not installed; install it with: pip install 'spdy-gpu[{extra}]'"
        )


@contextmanager
def user_code(what: str, fix: str) -> Iterator[None]:
    """A failure of the user's code in the block (a model function, its forward, a loss,
    a calibration or quality function) becomes one line naming `what`, the exception and
    `fix`; the original exception stays as the cause, which `--debug` prints. So does a
    sys.exit there."""
    try:
        yield
    except SpdyError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's code raises
        raise SpdyError(f"{what} raised {type(e).__name__}: {first_line(e)}; {fix}") from e
    except SystemExit as e:     # sys.exit or argparse in it would end spdy-gpu, even with 0
        raise SpdyError(f"{what} exited (sys.exit, status {e.code!r}); {fix} (script code "
                        "such as argument parsing belongs under `if __name__ == "
                        "'__main__':`)") from None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def problem_of(error: SpdyError) -> str:
    """A one-line error's problem without its fix (the text before its first '; '), for a
    caller that knows a better fix."""
    return str(error).split("; ")[0]


def function_name(function: object) -> str:
    """module.qualname of a function, for messages."""
    return (f"{getattr(function, '__module__', '?')}."
            f"{getattr(function, '__qualname__', type(function).__name__)}")


def check_types(values: dict[str, tuple[object, type | tuple[type, ...]]]) -> None:
    """Refuse the first value that is not of its type, in one line naming the option: int
    takes any integer (NumPy's too), float any real number, and neither a bool (unless bool
    is asked for);
    {"--max-rounds": (value, int)}."""
    abstract = {int: numbers.Integral, float: numbers.Real}
    for name, (value, kind) in values.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        accepted = tuple(abstract.get(k, k) for k in kinds)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, accepted):
            wanted = " or ".join("None" if k is type(None) else "a number" if k is float
                                 else "an integer" if k is int else k.__name__ for k in kinds)
            raise SpdyError(f"{name} must be {wanted}, not {type(value).__name__} {value!r}")


def as_path(value: object, what: str = "path") -> Path:
    """`value` (a str or os.PathLike) as a Path; anything else is refused in one line naming
    `what` (Path() would raise a TypeError deep inside the caller)."""
    if not isinstance(value, (str, os.PathLike)):
        raise SpdyError(f"{what} must be a path (str or os.PathLike), not "
                        f"{type(value).__name__} {value!r}")
    return Path(value)
