"""Static kernel report: compile every Triton kernel for sm_80 / sm_90 without a GPU and read the
cubin's resources (registers, spill, shared memory), compile time and theoretical occupancy,
plus a roofline on paper at B = 512, d = 3072.

    python benchmarks/kernel_report.py --arch sm90 sm80 [--K 1 2 ...] [--quick]

Writes benchmarks/results/kernels-<arch>.md and .json (one row per variant) and exits 1 when a
variant misses a target (compile > 30 s, any spill for K ≤ 4, > 64 B of spill for K = 5..8).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path

from fastmdm import kernel_report as kr

RESULTS = Path(__file__).resolve().parent / "results"


def _row_table(rows: list[dict]) -> list[str]:
    lines = ["| kernel | K | dtype | registers | spill B | stack B | shared B | warps | occupancy "
             "| compile CPU s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['K']} | {r['dtype']} | {r['error']} | | | | | | "
                         f"| {r['compile_seconds']} |")
            continue
        lines.append(f"| {r['kernel']} | {r['K']} | {r['dtype']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['stack_bytes']} | {r['shared_bytes']} | "
                     f"{r['num_warps']} | {r['occupancy']:.2f} | {r['compile_seconds']} | "
                     f"{r['wall_seconds']} |")
    return lines


def _roofline_table() -> list[str]:
    h100, h200 = kr.GPUS
    lines = ["| kernel | K | MB moved | MFLOP | bound | H100 µs (mem / flop) | H200 µs (mem / flop) "
             "| H200 target µs (70 % copy bw) |", "|---|---|---|---|---|---|---|---|"]
    for kernel in kr.FAMILIES:
        for K in kr.KS:
            a, b = kr.roofline(kernel, K, h100), kr.roofline(kernel, K, h200)
            lines.append(f"| {kernel} | {K} | {a['bytes'] / 1e6:.2f} | {a['flops'] / 1e6:.1f} | "
                         f"{b['bound']} | {a['memory_us']:.2f} / {a['compute_us']:.2f} | "
                         f"{b['memory_us']:.2f} / {b['compute_us']:.2f} | {b['target_us']:.2f} |")
    return lines


def render(arch: str, rows: list[dict], unlaunched: list[dict], args) -> str:
    import triton
    from fastmdm.kernels.common import TRANSITION_MAX_K

    peaks = "; ".join(f"{g.name}: {g.bandwidth / 1e12:g} TB/s, fp32 {g.fp32 / 1e12:g} TFLOP/s, "
                      f"fp64 {g.fp64 / 1e12:g} TFLOP/s" for g in kr.GPUS)
    bad = kr.violations(rows)
    out = [
        f"# Triton kernels on {arch}: static resources",
        "",
        f"Compiled {datetime.date.today()} with triton {triton.__version__} on "
        f"{platform.machine()} ({platform.node() or 'unknown host'}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f} at the end), no GPU: "
        f"`python benchmarks/kernel_report.py {' '.join(sys.argv[1:])}`. Registers per thread and "
        "spill stores from ptxas `-v`, stack and static shared memory from `cuobjdump -res-usage`, "
        "plus Triton's dynamic shared memory. Occupancy: warps resident per SM / 64 "
        "(formula in fastmdm/kernel_report.py). Each variant uses the heaviest flags its launcher "
        "can pass (full start, noise from the seed, every gradient, three inputs). Compile time: "
        "CPU seconds of Triton and ptxas (the target's measure), and wall-clock, which the "
        "machine's load inflates.",
        "",
        f"Targets: compile ≤ {kr.MAX_COMPILE_SECONDS:g} s; spill ≤ {kr.MAX_SPILL_SMALL_K} B for "
        f"K ≤ 4, ≤ {kr.MAX_SPILL_LARGE_K} B for K = 5..8. "
        + ("**All variants meet them.**" if not bad else f"**{len(bad)} miss:**"),
        "",
        *(f"- {b}" for b in bad),
        "",
        f"The transition kernel keeps each K×K matrix of a sample in one lane's float64 "
        f"registers; it runs for K ≤ {TRANSITION_MAX_K} (`TRANSITION_MAX_K` in "
        f"kernels/common.py) and larger K take the torch path (batched K×K matmuls, a few "
        f"launches).",
        "",
        *_row_table(rows),
        "",
    ]
    if unlaunched:
        out += ["## Not launched: the per-lane transition kernel above TRANSITION_MAX_K", "",
                *_row_table(unlaunched), ""]
    out += ["## Roofline on paper (B = 512, d = 3072, float32 data)", "",
            f"Peaks assumed (NVIDIA datasheets, SXM, non-tensor-core): {peaks}. Bytes: the "
            "tensors one launch must read and write (hybrid start, noise regenerated from the "
            "seed, one probe, one network input); flops: multiply-adds × 2, Philox not counted. "
            "The memory-bound kernels' target is ≥ 70 % of copy bandwidth: time ≤ bytes / "
            "(0.7 · bandwidth).", "", *_roofline_table(), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(kr.ARCHS), default=["sm90", "sm80"])
    parser.add_argument("--K", nargs="+", type=int, default=list(kr.KS), choices=kr.KS)
    parser.add_argument("--dtype", nargs="+", choices=kr.DATA_DTYPES, default=list(kr.DATA_DTYPES))
    parser.add_argument("--kernels", nargs="+", choices=kr.FAMILIES, default=list(kr.FAMILIES))
    parser.add_argument("--quick", action="store_true", help="K ∈ {2, 8}, float32 data only")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per compile")
    parser.add_argument("--unlaunched", action="store_true",
                        help="also compile the transition kernel above TRANSITION_MAX_K")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    ks, dtypes = ((2, 8), ("fp32",)) if args.quick else (tuple(args.K), tuple(args.dtype))
    warnings.filterwarnings("ignore", module="triton")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for arch in args.arch:
        todo = kr.variants(ks, dtypes, args.kernels)
        rows = []
        for i, v in enumerate(todo, 1):
            rows.append(kr.compile_variant(v, arch, args.timeout))
            r = rows[-1]
            print(f"[{i}/{len(todo)}] {arch} {v.kernel} K={v.K} {v.dtype}: "
                  + (r["error"] if r.get("error") else f"{r['registers']} registers, "
                     f"{r['spill_bytes']} B spill, {r['compile_seconds']} s"), flush=True)
        unlaunched = []
        if args.unlaunched and "transition" in args.kernels:
            extra = [kr.Variant("transition", K, "fp64") for K in ks
                     if K not in kr.launched_ks("transition")]
            unlaunched = [kr.compile_variant(v, arch, args.timeout) for v in extra]
        json_rows = [{k: r[k] for k in kr.ROW_KEYS} for r in rows]
        (args.out / f"kernels-{arch}.json").write_text(json.dumps(json_rows, indent=1) + "\n")
        (args.out / f"kernels-{arch}.md").write_text(render(arch, rows, unlaunched, args))
        for line in kr.violations(rows):
            print(f"target missed: {line}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
