"""Figures from timing tables (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from .errors import SpdyError
from .jsonio import atomic_write_bytes, check_output_file
from .options import SparsityOption
from .profile import Profile
from .timing import TimingTable

FORMATS = ("png", "pdf", "svg")      # chosen by the file's suffix


def check_plot_file(path: str | os.PathLike, flag: str = "--plot") -> Path:
    """`path` as a figure file to write, refused before any work: writable (see
    check_output_file) and named with a suffix in FORMATS, which picks the format."""
    path = check_output_file(path, flag)
    _figure_format(path, flag)
    return path


def _figure_format(path: str | os.PathLike, flag: str) -> str:
    """The FORMATS entry `path`'s suffix names."""
    suffix = Path(path).suffix
    if suffix.lower().lstrip(".") not in FORMATS:
        raise SpdyError(f"{flag} {path}: unknown figure format {suffix or '(no suffix)'!r}; "
                        f"end the name in {', '.join('.' + f for f in FORMATS)}")
    return suffix.lower().lstrip(".")


def layer_role(name: str) -> str:
    """A layer's name with block indices wildcarded: 'bert.encoder.layer.3.output.dense' ->
    'bert.encoder.layer.*.output.dense' (layers of one role share a curve colour)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def speedup_curves(table: TimingTable) -> tuple[np.ndarray, np.ndarray]:
    """(sparsities [options-1], per-layer speedup over dense [layers, options-1]); NaN where
    an option is unsupported. Speedup < 1 means the sparse kernel is slower than dense."""
    times = table.times()
    sparsities = np.array([o.sparsity for o in table.options[1:]])
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup = times[:, :1] / times[:, 1:]
    # a layer too small for the engine's clock (0 ms) has no meaningful speedup
    speedup[~np.isfinite(times[:, 1:]) | ~np.isfinite(speedup) | (speedup <= 0)] = np.nan
    return sparsities, speedup


def plot_speedup_curves(table: TimingTable, path: str | os.PathLike,
                        title: str | None = None) -> Path:
    """Two panels: (left) every layer's speedup over its dense time against sparsity,
    coloured by role, with the region where sparse is slower than dense shaded; (right) the
    whole model's predicted time (fixed + sum of layers) at uniform sparsity, next to dense."""
    plt = _pyplot()
    sparsities, speedup = speedup_curves(table)
    roles = list(dict.fromkeys(layer_role(name) for name in table.layer_names))
    colours = plt.get_cmap("tab10")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

    for row, name in enumerate(table.layer_names):
        role = roles.index(layer_role(name))
        left.plot(sparsities, speedup[row], color=colours(role % 10), lw=0.9, alpha=0.75,
                  label=layer_role(name) if row == table.layer_names.index(
                      next(n for n in table.layer_names if layer_role(n) == roles[role]))
                  else None)
    slower = np.nan_to_num(speedup, nan=np.inf) < 1.0
    if slower.any():
        rows, cols = np.nonzero(slower)
        left.scatter(sparsities[cols], speedup[rows, cols], s=14, color="black", zorder=3,
                     label=f"sparse slower than dense ({slower.sum()} points)")
    low, high = min(np.nanmin(speedup), 1.0) * 0.9, np.nanmax(speedup) * 1.1
    left.axhline(1.0, color="grey", ls="--", lw=1)
    left.axhspan(low, 1.0, color="red", alpha=0.08)        # sparse slower than dense
    left.set_yscale("log", base=2)
    left.set(xlabel="sparsity", ylabel="layer speedup over dense (x, log scale)",
             title="per-layer speedup (shaded: sparse slower than dense)", ylim=(low, high))
    left.legend(fontsize=7, loc="upper left")

    times = table.times()
    uniform = table.fixed_ms + np.where(np.isfinite(times[:, 1:]), times[:, 1:],
                                        times[:, :1]).sum(0)
    right.plot(np.r_[0.0, sparsities], np.r_[table.fixed_ms + times[:, 0].sum(), uniform],
               marker=".", label="predicted: fixed + sum of layers")
    right.axhline(table.dense_total_ms, color="grey", ls="--",
                  label=f"dense end to end ({table.dense_total_ms:.3g} ms)")
    right.axhline(table.fixed_ms, color="red", ls=":",
                  label=f"fixed, not prunable ({table.fixed_ms:.3g} ms)")
    right.set(xlabel="uniform sparsity of every layer", ylabel="model time (ms)",
              title="whole model at uniform sparsity", ylim=(0, None))
    right.legend(fontsize=8)

    fp = table.fingerprint
    tag = " [ESTIMATED]" if table.estimated and "ESTIMATED" not in fp.device else ""
    threads = f"{fp.threads} thread{'s' if fp.threads != 1 else ''}"
    fig.suptitle(title or f"{table.model} on {fp.backend} {fp.backend_version}, {fp.device}, "
                 f"{threads}, batch {fp.batch_size}, {fp.input_shape}{tag}")
    return _save(fig, path)


def plot_profile(table: TimingTable, profile: Profile, curve: tuple[np.ndarray, np.ndarray],
                 profile_error: float, path: str | os.PathLike,
                 error_label: str = "total error") -> Path:
    """Two panels: (left) the DP frontier, least total error against predicted speedup, with
    the chosen profile marked at its own total error (Planner.total_error); (right) the
    profile, each layer's chosen sparsity as a bar and its time against dense."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), width_ratios=(2, 3))

    speedups, errors = curve
    # A step function of the budget: between two budgets only the smaller one's is sure.
    left.step(speedups, errors, where="pre", lw=1.2,
              label="DP frontier (best choice per budget)")
    left.scatter([profile.predicted_speedup], [profile_error], color="red", zorder=3,
                 label=f"this profile: {profile.predicted_speedup:.3f}x predicted")
    left.axvline(profile.target_speedup, color="grey", ls="--", lw=1,
                 label=f"target {profile.target_speedup:g}x")
    left.set(xlabel="predicted speedup over dense (x)", ylabel=error_label,
             title="error-speedup frontier")
    left.legend(fontsize=8)

    names = list(profile.choices)
    index = {o: i for i, o in enumerate(table.options)}
    rows = {name: i for i, name in enumerate(table.layer_names)}
    times = table.times()
    dense_ms = np.array([times[rows[n], 0] for n in names])
    chosen_ms = np.array([times[rows[n], index[profile.choices[n]]] for n in names])
    x = np.arange(len(names))
    families = [_family_label(profile.choices[n]) for n in names]
    for i, family in enumerate(dict.fromkeys(f for f in families if f)):   # a colour each
        at = [j for j, f in enumerate(families) if f == family]
        right.bar(x[at], [profile.choices[names[j]].sparsity for j in at], alpha=0.6,
                  color=f"C{i}", label=f"sparsity, {family}")
    right.set(ylim=(0, 1.2), ylabel="sparsity", xlabel="layer (in model order)",
              title=f"profile: {sum(o.pattern != 'dense' for o in profile.choices.values())}"
                    f" of {len(names)} layers pruned")
    right.set_xticks(x, _without_common_prefix(names), rotation=90, fontsize=6)
    ms = right.twinx()
    ms.plot(x, dense_ms, "k.", ms=4, label="dense time")
    ms.plot(x, chosen_ms, "r.", ms=4, label="chosen time")
    ms.set(ylabel="layer time (ms)", ylim=(0, 1.2 * dense_ms.max()))
    handles = right.get_legend_handles_labels()
    more = ms.get_legend_handles_labels()
    right.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper center", ncol=3)

    fp = profile.fingerprint
    tag = " [ESTIMATED]" if profile.estimated and "ESTIMATED" not in fp.device else ""
    fig.suptitle(f"{profile.model}: {profile.predicted_ms:.4g} ms predicted vs "
                 f"{profile.dense_total_ms:.4g} ms dense on {fp.backend}, {fp.device}{tag}")
    return _save(fig, path)


def _family_label(option: SparsityOption) -> str | None:
    """The option's structure without its level ("block 64x64", "2:4", "unstructured");
    None for dense."""
    if option.pattern == "block":
        return f"block {option.block[0]}x{option.block[1]}"
    if option.pattern == "nm":
        return f"{option.n}:{option.m}"
    return None if option.pattern == "dense" else option.pattern


def _without_common_prefix(names: list[str]) -> list[str]:
    """Module names without the dotted prefix they all share, for tick labels."""
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure atomically in the format its suffix names (see check_plot_file): a
    half-written figure never replaces a good one, and a failed write leaves no temporary
    file."""
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format=_figure_format(path, "figure"), dpi=120)
    finally:
        _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_comparison(report: dict, path: str | os.PathLike) -> Path:
    """A comparison (spdy_gpu.compare): the model's headline measure against the measured
    speedup, one line per method across targets, dense marked; (left) every method, (right)
    the reconstructed ones, zoomed in."""
    from .compare import NOT_RECONSTRUCTED, headline_metric, metric_of

    plt = _pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(14, 5))
    metric = headline_metric(report)
    targets = [t for t in report["targets"] if not t.get("unreachable")]
    methods = list(dict.fromkeys(row["method"] for t in targets for row in t["rows"]))
    lines = {method: sorted((row["measured_speedup"], metric_of(row, metric))
                            for t in targets for row in t["rows"]
                            if row["method"] == method and metric_of(row, metric) is not None)
             for method in methods}
    for panel, shown in zip(panels, (methods, [m for m in methods
                                               if m not in NOT_RECONSTRUCTED])):
        for number, method in enumerate(methods):
            if method not in shown or not lines[method]:
                continue
            x, y = zip(*lines[method])
            if method == "dense":
                panel.axhline(float(np.mean(y)), color="black", ls="--", lw=1, label="dense")
                continue
            panel.plot(x, y, ":" if method in NOT_RECONSTRUCTED else "-", marker="o", ms=4,
                       color=f"C{number % 10}",
                       lw=2.2 if method.startswith("spdy") else 1.2, label=method)
        for t in targets:
            panel.axvline(t["target"], color="grey", lw=0.6, alpha=0.5)
        panel.set(xlabel="measured speedup over dense (x)", ylabel=metric)
        panel.legend(fontsize=8)
    panels[0].set_title("every method (dotted: magnitude masks, no reconstruction)")
    panels[1].set_title("reconstructed methods")
    fig.suptitle(f"{report['model']} on {report['backend']}: {metric} at measured speedup")
    return _save(fig, path)


def plot_profile_sparsity(profiles: dict[str, Profile], path: str | os.PathLike) -> Path:
    """Per-layer sparsity of several profiles of one model (e.g. batch 1 against batch 16),
    grouped bars in layer order."""
    plt = _pyplot()
    names = list(next(iter(profiles.values())).choices)
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(names)), 4.5))
    width = 0.8 / len(profiles)
    x = np.arange(len(names))
    for i, (label, profile) in enumerate(profiles.items()):
        ax.bar(x + i * width, [profile.choices[n].sparsity if n in profile.choices else 0.0
                               for n in names], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, _without_common_prefix(names), rotation=90, fontsize=6)
    ax.set(ylabel="sparsity", ylim=(0, 1.05), title="per-layer sparsity by profile")
    ax.legend(fontsize=8)
    return _save(fig, path)
