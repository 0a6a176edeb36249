"""User-facing errors: each carries a one-line message naming the problem and the fix."""


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
