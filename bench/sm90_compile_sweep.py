"""Every launch configuration the autotuner may pick, compiled for an H100 (sm_90) on the CPU.

For each dtype, block shape, schedule (direct / stream-K), load path (TMA / pointers) and M
bucket, the configurations `_prune` keeps under an H100's 227 KiB of shared memory are
compiled ahead of time (no GPU). Reports compile failures, configurations over the shared
memory limit, the largest shared memory against the pruning estimate, and whether each
compiled kernel uses wgmma and (where asked) TMA. A kernel that does not compile here would
only be skipped by the autotuner on the GPU; this finds it first.

    python bench/sm90_compile_sweep.py [--out bench/results]   (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from datetime import date
from pathlib import Path

import torch
from spdy_kernels import bsr_matmul
from tqdm import tqdm

from spdy_gpu.cli.common import run_script
from spdy_gpu.jsonio import atomic_write_bytes, check_output_dir

H100_SHARED = 232448            # bytes per block, opt-in (sm_90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (64, 16), (16, 64))


def jobs() -> list[tuple]:
    """(dtype, block, stream_k, tma, M bucket, config) for every configuration kept."""
    bsr_matmul._smem_bytes = lambda device: H100_SHARED       # prune with an H100's budget
    found = []
    for dtype, block, stream, tma in itertools.product(DTYPES, BLOCKS, (False, True),
                                                       (False, True)):
        for bucket in ((16, 64) if stream else (16, 64, 128, 4096)):
            kept = bsr_matmul._prune(bsr_matmul._configs(stream=stream, direct=not stream),
                                     {"x_ptr": torch.empty(1, dtype=dtype), "M_BUCKET": bucket},
                                     BLOCK_N=block[0], BLOCK_K=block[1])
            found += [(dtype, block, stream, tma, bucket, c) for c in kept]
    return found


def compile_one(dtype, block, stream, tma, bucket, config) -> dict:
    row = {"dtype": str(dtype).removeprefix("torch."), "block": list(block),
           "schedule": "stream-K" if stream else "direct", "tma": tma, "m_bucket": bucket,
           "config": {**config.kwargs, "num_warps": config.num_warps,
                      "num_stages": config.num_stages}}
    try:
        compiled = bsr_matmul.compile_for(config, dtype, block, stream, tma)
    except Exception as e:  # noqa: BLE001 - a failure is the finding
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    ttgir = compiled.asm["ttgir"]
    estimate = bsr_matmul._shared_bytes(*block, config.kwargs["BLOCK_T"], dtype.itemsize,
                                        config.num_stages)
    return {**row, "shared": compiled.metadata.shared, "estimate": estimate,
            "wgmma": "warp_group_dot" in ttgir,
            "tma_loads": "async_tma_copy_global_to_local" in ttgir}


def summary(rows: list[dict], seconds: float) -> str:
    failed = [r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    over = [r for r in ok if r["shared"] > H100_SHARED]
    no_wgmma = [r for r in ok if r["dtype"] != "float32" and not r["wgmma"]]
    no_tma = [r for r in ok if r["tma"] and not r["tma_loads"]]
    worst = max(ok, key=lambda r: r["shared"] / r["estimate"], default=None)
    lines = [f"# sm_90 compile sweep of the BSR kernel ({date.today()}, CPU, no GPU)", "",
             f"- configurations compiled: {len(rows)} in {seconds:.0f} s; failures: "
             f"{len(failed)}",
             f"- over the H100's {H100_SHARED} B of shared memory: {len(over)}",
             f"- 16-bit kernels without wgmma: {len(no_wgmma)}"
             + (f" (block rows {sorted({r['block'][0] for r in no_wgmma})})" if no_wgmma else ""),
             f"- TMA kernels without TMA loads: {len(no_tma)}"]
    if worst:
        lines.append(f"- largest shared / pruning estimate: "
                     f"{worst['shared'] / worst['estimate']:.2f} ({worst['shared']} B, "
                     f"{worst['dtype']} {worst['block']} {worst['schedule']} {worst['config']})")
    lines += [f"- FAILED {r['dtype']} {r['block']} {r['schedule']} tma={r['tma']} "
              f"{r['config']}: {r['error']}" for r in failed[:20]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    check_output_dir(args.out)                          # before ten minutes of compiles
    started = time.perf_counter()
    rows = [compile_one(*job) for job in tqdm(jobs(), desc="sm_90 compiles", unit="config")]
    text = summary(rows, time.perf_counter() - started)
    stem = Path(args.out) / f"sm90-compile-sweep-{date.today()}"
    rows_text = "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n"  # a row a line
    atomic_write_bytes(stem.with_suffix(".json"), rows_text.encode())
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    run_script(main)
