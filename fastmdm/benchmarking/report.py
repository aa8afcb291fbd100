"""The report: Markdown ratio table, GPU targets, and the JSON + Markdown files of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .cases import Size
from .schema import params_key, validate_report
from .suite import run_suite


def _ms(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_s'] * 1e3:.3g} ± {row['iqr_s'] * 1e3:.2g}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g} ({1 / value:.3g}×)"


def ratio_table(report: dict) -> str:
    """Markdown table: per case and size the fast median (ms ± IQR) and the fast/other ratios."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in report["rows"]:
        by_key.setdefault(params_key(row), {})[row["impl"]] = row
    lines = [
        "| case | size | dtype | fast ms (± IQR) | reference ms | fast/ref (speed-up) | batched ms "
        "| fast/batched | torch ms | fast/torch | compile ms | fast/compile "
        "| fast GB/s (% of copy) of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {(r["case"], tuple(sorted(r["params"].items())), r["dtype"]): r for r in report["ratios"]}
    for key, impls in by_key.items():
        case, B, K, d, extra, dtype = key
        fast = impls.get("fast")
        size = Size(B, K, d, extra).label()
        if fast is not None and fast["status"] in ("skipped", "failed"):
            lines.append(f"| {case} | {size} | {dtype} | {fast['status']}: {fast['reason']} "
                         "| | | | | | | | | |")
            continue
        ratio = ratios.get((case, tuple(sorted({"B": B, "K": K, "d": d, **dict(extra)}.items())), dtype), {})
        bandwidth = "—"
        if fast is not None and "gbps" in fast:
            bandwidth = f"{fast['gbps']:.3g}"
            if "fraction_of_copy" in fast:
                bandwidth += f" ({100 * fast['fraction_of_copy']:.0f}%)"
            bandwidth += f" of {fast['floor_bytes'] / 1e6:.3g} MB"
        torch_cell = _ms(impls.get("torch")) if "torch" in impls else "= fast"
        lines.append(
            f"| {case} | {size} | {dtype} | {_ms(fast)} | {_ms(impls.get('reference'))} "
            f"| {_ratio(ratio.get('fast_over_reference'))} | {_ms(impls.get('batched'))} "
            f"| {_ratio(ratio.get('fast_over_batched'))} | {torch_cell} "
            f"| {_ratio(ratio.get('fast_over_torch'))} | {_ms(impls.get('compile'))} "
            f"| {_ratio(ratio.get('fast_over_compile'))} | {bandwidth} |")
    return "\n".join(lines)


BANDWIDTH_TARGET = 0.6  # memory-bound fast rows should reach 60% of the measured copy bandwidth
# The bandwidth target applies to rows whose bytes floor takes at least this long at copy
# bandwidth; below it launch and host overheads, not memory, bound the time.
BANDWIDTH_MIN_FLOOR_S = 1e-4


def target_summary(report: dict) -> list[str]:
    """The issue's GPU targets, checked on this report: one line per miss, or why unchecked.

    On CUDA every memory-bound fast row large enough to be bandwidth-bound (floor bytes
    moving for >= BANDWIDTH_MIN_FLOOR_S at copy bandwidth) needs >= BANDWIDTH_TARGET of the
    copy bandwidth, and every fast path must beat the reference and torch.compile (ratio < 1).
    """
    meta = report["metadata"]
    if meta["device"]["type"] != "cuda":
        return ["Not evaluated: the targets are for GPUs, and no GPU was measured in this run."]
    lines, small = [], 0
    for row in report["rows"]:
        if row["impl"] != "fast" or not row["memory_bound"] or "fraction_of_copy" not in row:
            continue
        if row["floor_bytes"] / (meta["copy_bandwidth_gbps"] * 1e9) < BANDWIDTH_MIN_FLOOR_S:
            small += 1
        elif row["fraction_of_copy"] < BANDWIDTH_TARGET:
            size = Size(row["B"], row["K"], row["d"], tuple(sorted(row["extra"].items()))).label()
            lines.append(f"{row['case']} {size}: {100 * row['fraction_of_copy']:.0f}% of copy "
                         f"bandwidth (< {100 * BANDWIDTH_TARGET:.0f}%)")
    for ratio in report["ratios"]:
        for other in ("reference", "compile"):
            value = ratio.get(f"fast_over_{other}")
            if value is not None and value >= 1:
                lines.append(f"{ratio['case']} {ratio['params']}: fast / {other} = {value:.3g} (not ahead)")
    if not lines:
        lines.append("Every checked row meets the targets.")
    if small:
        lines.append(f"{small} memory-bound rows move their bytes floor in under "
                     f"{BANDWIDTH_MIN_FLOOR_S * 1e6:.0f} µs at copy bandwidth: not checked for bandwidth.")
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown report: header (command, device, versions, copy bandwidth, notes) and tables."""
    meta = report["metadata"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v is not None)
    reasons = [r for r in report["rows"] if r["status"] == "n/a"]
    lines = [
        f"# fastmdm benchmark — preset `{meta['preset']}` on {meta['device']['type']}",
        "",
        f"- Date (UTC): {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Device: {meta['device']['type']} — {meta['device']['name']}; {meta['cpu_count']} CPUs, "
        f"{meta.get('torch_threads')} torch threads",
        f"- Versions: {versions}",
        f"- Backend: {meta.get('backend')}; dtype {meta.get('dtype')}; "
        f"torch.compile column {'on' if meta.get('compile', {}).get('enabled') else 'off'}",
        f"- Measured copy bandwidth: {meta['copy_bandwidth_gbps']:.1f} GB/s (2 · bytes / time of a "
        "tensor copy, same run)",
        f"- Total time: {meta.get('elapsed_s', 0.0):.0f} s",
        "",
        *[f"> {note}" for note in meta["notes"]],
        "",
        "Times are per call: median ± inter-quartile range. A ratio is fast median / other median "
        "(< 1: fast is quicker); the speed-up other / fast is in parentheses. reference is the "
        "published recipe with its loop over the batch, batched the same recipe batched (no loop, "
        "no fusion): fast/ref shows what de-looping and fusion gain, fast/batched what fusion gains. "
        "GB/s is the bytes "
        "floor of the operation (the least it must read and write) divided by the fast median; "
        "the perturbation and DSM rows are the memory-bound ones.",
        "",
        ratio_table(report),
        "",
        f"## Targets (memory-bound >= {100 * BANDWIDTH_TARGET:.0f}% of copy bandwidth; fast ahead of "
        "reference and torch.compile)",
        "",
        *[f"- {line}" for line in target_summary(report)],
        "",
    ]
    notes = dict.fromkeys(f"{r['case']}: {r['note']}" for r in report["rows"] if r.get("note"))
    if notes:
        lines += ["## Case notes", "", *[f"- {note}" for note in notes], ""]
    if reasons:
        grouped: dict[tuple[str, str], list[str]] = {}
        for r in reasons:
            size = Size(r["B"], r["K"], r["d"], tuple(sorted(r["extra"].items()))).label()
            grouped.setdefault((r["impl"], r["reason"]), []).append(f"{r['case']} {size}")
        lines += ["## Columns not measured", ""]
        lines += [f"- {impl}: {reason} ({'; '.join(where)})" for (impl, reason), where in grouped.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out) -> tuple[Path, Path]:
    """Write bench-<date>-<device>-<preset>.json and .md under ``out``; returns both paths."""
    validate_report(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = report["metadata"]
    stem = f"bench-{meta['date'][:10]}-{meta['device']['type']}-{meta['preset']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def run_bench(preset: str = "quick", device=None, out="benchmarks/results", *,
              compile: bool | None = None, dtype: torch.dtype = torch.float32,
              cases: list[str] | None = None) -> dict:
    """`fastmdm bench`: run the suite, print the ratio table, write JSON + Markdown under ``out``."""
    report = run_suite(preset, device, dtype=dtype, compile=compile, cases=cases)
    print()
    print(ratio_table(report))
    print("\ntargets:", *target_summary(report), sep="\n  ")
    json_path, md_path = write_report(report, out)
    print(f"\nwrote {json_path} and {md_path}")
    return report
