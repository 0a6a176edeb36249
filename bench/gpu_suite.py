"""GPU suite: the block-sparse kernel against dense cuBLAS, PyTorch's Triton BSR kernel and
the roofline, on real layer shapes, in one command.

    python bench/gpu_suite.py                 # full grid, bf16, about 4-8 minutes on an H100
    python bench/gpu_suite.py --quick         # 2 shapes x 2 M x 1 block x 2 densities
    python bench/gpu_suite.py --fresh         # ignore a partial result file and start over

Grid: (N x K) in BERT-base 768x768, 3072x768, 768x3072 and Llama-7B-like 4096x4096,
11008x4096, 4096x11008; M in {16, 128, 2048, 8192}; block {32, 64}; block density
{0.5, 0.3, 0.2, 0.1} (blocks chosen uniformly at random, exactly round(d * blocks) kept),
plus 64x64 blocks at density 0.7 (30% sparsity) for the break-even target.

Per cell it times, with triton.testing.do_bench (CUDA events, L2 flushed between runs,
median): ours (`bsr_linear`, autotuned, after one warm-up call that tunes), dense
`torch.nn.functional.linear` on the dense weight, and `torch.sparse._triton_ops.bsr_dense_mm`
on the same blocks (given X^T contiguous, computing Y^T; its transposes are not timed).
The roofline floor comes from ceilings measured at the start of the run: a bf16 8192^3
matmul (FLOP/s) and a 1 GiB device copy (bytes/s); spdy_gpu.roofline has the formula.

Output, under --out (default bench/results/), named after the GPU, e.g. kernel_suite_h100.json:
- JSON (format "spdy-gpu/kernel-suite", version 1): device, software versions, ceilings
  {peak_flops, bandwidth}, settings {warmup_ms, rep_ms, dtype}, and rows, one per cell:
  n, k, m, block, density, nnz_blocks, split_k (true: the split-K path ran), config (the
  tuned BLOCK_M, GROUP_M, SPLIT_WAVES, num_warps, num_stages),
  ours_ms, dense_ms, torch_bsr_ms (null if it failed; torch_bsr_error then says why),
  floor_ms (sparse roofline), dense_floor_ms, speedup (dense_ms / ours_ms), vs_torch
  (torch_bsr_ms / ours_ms: > 1 means ours is faster), roofline_speedup (dense_floor_ms /
  floor_ms), roofline_fraction (speedup / roofline_speedup), rel_err (ours against dense
  F.linear on the masked weight, relative Frobenius).
- Markdown (same name, .md): one table row per cell with those figures, then a summary:
  median vs_torch, the share of cells meeting the roofline targets (>= 0.8 where M <= 64,
  >= 0.7 where M >= 2048, at densities 0.1..0.5), how many 64x64 cells at 30% sparsity
  are at least as fast as dense, and per shape and M the highest density at which 64x64
  blocks beat dense.
The JSON is rewritten atomically after every cell; a rerun resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

SHAPES = {"bert-base": [(768, 768), (3072, 768), (768, 3072)],
          "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)]}
MS = (16, 128, 2048, 8192)
BLOCKS = (32, 64)
DENSITIES = (0.5, 0.3, 0.2, 0.1)
BREAK_EVEN = (64, 0.7)      # extra cells: 64x64 blocks at 30% sparsity must not lose to dense
SUITE_FORMAT, SUITE_VERSION = "spdy-gpu/kernel-suite", 1
log = logging.getLogger("gpu_suite")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device found; run it on a machine with an NVIDIA GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from spdy_gpu.jsonio import load_json, save_json
    from spdy_gpu.roofline import Ceilings, measure_ceilings

    device = torch.cuda.get_device_name()
    path = Path(args.out) / f"kernel_suite_{_slug(device)}{'_quick' if args.quick else ''}.json"
    settings = {"dtype": "bfloat16", "warmup_ms": args.warmup, "rep_ms": args.rep}
    done: dict[tuple, dict] = {}
    ceilings = None
    if path.exists() and not args.fresh:
        old = load_json(path, SUITE_FORMAT, SUITE_VERSION)
        if old["device"] == device and old["settings"] == settings:
            done = {_key(r): r for r in old["rows"]}
            ceilings = Ceilings(**old["ceilings"])
            log.info("resuming %s: %d cells already measured", path, len(done))
    if ceilings is None:
        ceilings = measure_ceilings("bfloat16")
    log.info("ceilings on %s: %.0f TFLOP/s bf16 matmul, %.2f TB/s copy", device,
             ceilings.peak_flops / 1e12, ceilings.bandwidth / 1e12)

    cells = _grid(args.quick)
    body = {"device": device, "software": _software(), "ceilings": asdict(ceilings),
            "settings": settings, "rows": list(done.values())}
    from tqdm import tqdm
    dense_ms = {(r["n"], r["k"], r["m"]): r["dense_ms"] for r in done.values()}
    for (n, k), m, block, density in tqdm(cells, desc="kernel suite", unit="cell"):
        if (n, k, m, block, density) in done:
            continue
        row = _measure(n, k, m, block, density, ceilings, args.warmup, args.rep, dense_ms)
        done[_key(row)] = row
        body["rows"] = list(done.values())
        save_json(path, SUITE_FORMAT, SUITE_VERSION, body)
    rows = [done[key] for key in sorted(done)]
    markdown = _markdown(rows, device, ceilings)
    from spdy_gpu.jsonio import atomic_write_bytes
    atomic_write_bytes(path.with_suffix(".md"), markdown.encode())
    print(markdown.split("## Summary", 1)[-1].strip())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="output folder (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="a small grid, for a smoke run")
    parser.add_argument("--fresh", action="store_true", help="do not resume a partial file")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=40, help="do_bench measuring time, ms")
    return parser.parse_args(argv)


def _grid(quick: bool) -> list[tuple]:
    shapes = SHAPES["bert-base"] + SHAPES["llama-7b"]
    if quick:
        return [(s, m, 64, d) for s in (shapes[0], shapes[4]) for m in (16, 2048)
                for d in (0.5, 0.1)]
    cells = [(s, m, b, d) for s in shapes for m in MS for b in BLOCKS for d in DENSITIES]
    return cells + [(s, m, *BREAK_EVEN) for s in shapes for m in MS]


def _measure(n: int, k: int, m: int, block: int, density: float, ceilings, warmup: int,
             rep: int, dense_ms: dict[tuple, float]) -> dict:
    """Time one cell: ours, dense F.linear (once per shape and M, cached in `dense_ms`),
    PyTorch's bsr_dense_mm; add the roofline."""
    from spdy_kernels import bsr_matmul
    from triton.testing import do_bench

    from spdy_gpu.bsr import BSRWeight
    from spdy_gpu.roofline import roofline_ms

    gen = torch.Generator(device="cuda").manual_seed(hash((n, k, m, block, density)) % 2**31)
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    packed = BSRWeight.from_dense(weight, _random_block_mask(n, k, block, density, gen), block)
    masked = packed.to_dense()

    def bench(fn) -> float:
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    y = bsr_matmul.bsr_linear(x, packed)          # tunes this shape bucket once
    reference = torch.nn.functional.linear(x.float(), masked.float())
    rel_err = ((y.float() - reference).norm() / reference.norm()).item()
    split = bsr_matmul._use_split(packed, m, x.device, None)
    best = getattr(bsr_matmul._tuned(split), "best_config", None)
    ours = bench(lambda: bsr_matmul.bsr_linear(x, packed))
    if (n, k, m) not in dense_ms:
        dense_ms[n, k, m] = bench(lambda: torch.nn.functional.linear(x, weight))
    dense = dense_ms[n, k, m]
    torch_ms, torch_error = _time_torch_bsr(packed, x, bench)

    ceiling = dict(peak_flops=ceilings.peak_flops, bandwidth=ceilings.bandwidth)
    floor = roofline_ms(n, k, m, packed.density, block, 2, **ceiling)
    dense_floor = roofline_ms(n, k, m, dtype_bytes=2, **ceiling)
    speedup = dense / ours
    row = {"n": n, "k": k, "m": m, "block": block, "density": density,
           "nnz_blocks": packed.nnz_blocks, "split_k": split,
           "config": None if best is None else {**best.kwargs, "num_warps": best.num_warps,
                                                "num_stages": best.num_stages},
           "ours_ms": ours, "dense_ms": dense, "torch_bsr_ms": torch_ms,
           "floor_ms": floor, "dense_floor_ms": dense_floor, "speedup": speedup,
           "vs_torch": None if torch_ms is None else torch_ms / ours,
           "roofline_speedup": dense_floor / floor,
           "roofline_fraction": speedup / (dense_floor / floor), "rel_err": rel_err}
    if torch_error:
        row["torch_bsr_error"] = torch_error
    return row


def _time_torch_bsr(packed, x: torch.Tensor, bench) -> tuple[float | None, str | None]:
    """PyTorch's Triton BSR kernel on the same blocks: Y^T = W @ X^T."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
        bsr = packed.to_torch_sparse()
        xt = x.t().contiguous()
        out = torch.empty(bsr.shape[0], x.shape[0], device=x.device, dtype=x.dtype)
        with warnings.catch_warnings():     # "no tuned parameters for this GPU"
            warnings.simplefilter("ignore")
            bsr_dense_mm(bsr, xt, out=out)
            return bench(lambda: bsr_dense_mm(bsr, xt, out=out)), None
    except Exception as e:  # a baseline that fails is reported, not fatal
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _random_block_mask(n: int, k: int, block: int, density: float,
                       gen: torch.Generator) -> torch.Tensor:
    """Exactly round(density * blocks) blocks kept, uniformly at random."""
    rows, cols = -(-n // block), -(-k // block)
    order = torch.randperm(rows * cols, device="cuda", generator=gen)
    keep = torch.zeros(rows * cols, dtype=torch.bool, device="cuda")
    keep[order[: round(density * rows * cols)]] = True
    full = keep.reshape(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[:n, :k]


def _markdown(rows: list[dict], device: str, ceilings) -> str:
    def f(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def ms(value):
        return "n/a" if value is None else f"{value:.4g}"

    lines = [f"# Block-sparse kernel suite on {device} (bf16)", "",
             f"Ceilings measured in this run: {ceilings.peak_flops / 1e12:.0f} TFLOP/s "
             f"(bf16 matmul), {ceilings.bandwidth / 1e12:.2f} TB/s (device copy).", "",
             "| N x K | M | block | density | ours ms | dense ms | torch bsr ms | speedup "
             "| vs torch | roofline speedup | fraction of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['block']} | {r['density']} "
                     f"| {ms(r['ours_ms'])} | {ms(r['dense_ms'])} | {ms(r['torch_bsr_ms'])} "
                     f"| {f(r['speedup'])} | {f(r['vs_torch'])} | {f(r['roofline_speedup'])} "
                     f"| {f(r['roofline_fraction'])} |")
    lines += ["", "## Summary", ""] + _summary(rows)
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict]) -> list[str]:
    lines = []
    ratios = [r["vs_torch"] for r in rows if r["vs_torch"] is not None]
    if ratios:
        lines.append(f"- median speed ratio over torch bsr_dense_mm: "
                     f"{statistics.median(ratios):.2f}x over {len(ratios)} cells (target 1.5x)")
    for name, test, target in (("M <= 64", lambda m: m <= 64, 0.8),
                               ("M >= 2048", lambda m: m >= 2048, 0.7)):
        cells = [r for r in rows if test(r["m"]) and 0.1 <= r["density"] <= 0.5]
        if cells:
            met = sum(r["roofline_fraction"] >= target for r in cells)
            median = statistics.median(r["roofline_fraction"] for r in cells)
            lines.append(f"- {name}: {met}/{len(cells)} cells reach {target} of the roofline "
                         f"speedup (median fraction {median:.2f})")
    block, density = BREAK_EVEN
    even = [r for r in rows if r["block"] == block and r["density"] == density]
    if even:
        met = sum(r["speedup"] >= 1.0 for r in even)
        lines.append(f"- {block}x{block} blocks at density {density}: {met}/{len(even)} cells "
                     f"at least as fast as dense (slowest: "
                     f"{min(r['speedup'] for r in even):.2f}x)")
    for (n, k, m) in sorted({(r["n"], r["k"], r["m"]) for r in rows if r["block"] == 64}):
        wins = [r["density"] for r in rows if (r["n"], r["k"], r["m"], r["block"]) == (n, k, m, 64)
                and r["speedup"] >= 1.0]
        even = f"beats dense up to density {max(wins)}" if wins else "never beats dense here"
        lines.append(f"- {n}x{k}, M={m}, 64x64 blocks: {even}")
    worst = max(rows, key=lambda r: r["rel_err"], default=None)
    if worst is not None:
        lines.append(f"- largest relative error vs dense on the masked weight: "
                     f"{worst['rel_err']:.1e}")
    return lines


def _key(row: dict) -> tuple:
    return row["n"], row["k"], row["m"], row["block"], row["density"]


def _slug(device: str) -> str:
    words = [w for w in device.lower().replace("nvidia", "").split() if w]
    return "_".join(words)[:40] or "gpu"


def _software() -> dict[str, str]:
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda)}


if __name__ == "__main__":
    sys.exit(main())
