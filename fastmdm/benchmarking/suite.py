"""The suite: every (case, size) of a preset timed for each implementation, rows and ratios.

Implementations per case: ``fast`` (what fastmdm runs by default on the device), ``torch``
(the same call with the backend forced to "torch", only where it differs from fast),
``compile`` (torch.compile of the torch path, optional and time-bounded), ``batched`` (the
published recipe batched) and ``reference`` (the published recipe, looped). A ratio is
fast median / other median from the same run: fast / reference is what de-looping and
fusion gain together, fast / batched what fusion gains.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..backend import use_triton
from .cases import CASES, Case, CaseSkipped, Size, Workload
from .metadata import run_metadata
from .presets import Preset, get_preset, iter_cases
from .schema import RATIO_FIELDS, SCHEMA_VERSION, params_key
from .timing import Timing, compiled, copy_bandwidth, measure_interleaved, under_backend


def implementations(workload: Workload, device, compile: bool = False) -> dict[str, Callable]:
    """The callables to time, by impl name; "torch" only where the fast path is not the torch path."""
    device = torch.device(device)
    impls = {"fast": workload.fast or workload.torch_path}
    if use_triton(device):
        impls["torch"] = under_backend(workload.torch_path, "torch")
    if compile:
        impls["compile"] = compiled(workload.torch_path)
    if workload.batched is not None:
        impls["batched"] = workload.batched
    impls["reference"] = workload.reference
    return impls


def _row(case: Case, size: Size, impl: str, device, dtype, status: str, timing: Timing | None = None,
         reason: str | None = None, floor_bytes: int | None = None,
         copy_gbps: float | None = None) -> dict:
    row = {"case": case.name, "impl": impl, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "B": size.B, "K": size.K, "d": size.d, "extra": dict(size.extra), "status": status,
           "median_s": None, "iqr_s": None, "n": 0, "number": 0, "memory_bound": case.memory_bound}
    if reason is not None:
        row["reason"] = reason
    if timing is not None:
        row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, n=timing.n, number=timing.number,
                   warmup_s=timing.warmup_s)
        if floor_bytes is not None:
            row["floor_bytes"] = floor_bytes
            row["gbps"] = floor_bytes / timing.median_s / 1e9
            if copy_gbps:
                row["fraction_of_copy"] = row["gbps"] / copy_gbps
    return row


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]

def compute_ratios(rows: list[dict]) -> list[dict]:
    """fast / other median-time ratios (< 1: fast is quicker) per case and size, same run only."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(params_key(row), {})[row["impl"]] = row
    ratios = []
    for key, by_impl in groups.items():
        fast = by_impl.get("fast")
        if fast is None or fast["status"] != "ok":
            continue
        entry = {"case": key[0], "params": {"B": key[1], "K": key[2], "d": key[3], **dict(key[4])},
                 "dtype": key[5]}
        for field in RATIO_FIELDS:
            other = by_impl.get(field.removeprefix("fast_over_"))
            ok = other is not None and other["status"] == "ok"
            entry[field] = fast["median_s"] / other["median_s"] if ok else None
        ratios.append(entry)
    return ratios


def _case_rows(case: Case, size: Size, device, dtype, config: Preset, compile: bool,
               copy_gbps: float, compile_clock: list[float], log: Callable[[str], None]) -> list[dict]:
    """Rows of one (case, size): every implementation timed, or the reason it was not.

    ``compile_clock`` holds the compile seconds spent so far in the run (updated here).
    """
    compile_here = compile and (config.compile_cases is None or case.name in config.compile_cases)
    try:
        workload = case.build(size, device, dtype)
        impls = implementations(workload, device, compile=compile_here)
    except Exception as err:  # noqa: BLE001 -- a missing module or broken case becomes a row, not a crash
        status = "skipped" if isinstance(err, CaseSkipped) else "failed"
        reason = str(err) if status == "skipped" else _reason(err)
        log(f"{case.name:<13} {size.label():<28} {status}: {reason}")
        return [_row(case, size, "fast", device, dtype, status, reason=reason)]
    rows = []
    if compile and not compile_here:
        rows.append(_row(case, size, "compile", device, dtype, "n/a",
                         reason=f"the {config.name} preset compiles only {', '.join(config.compile_cases)}"))
    if "compile" in impls and compile_clock[0] >= config.compile_budget_s:
        del impls["compile"]
        rows.append(_row(case, size, "compile", device, dtype, "n/a",
                         reason=f"compile budget of {config.compile_budget_s:.0f} s spent"))
    results = measure_interleaved(impls, device, budget_s=config.budget_s, min_samples=config.min_samples,
                                  max_samples=config.max_samples)
    if "compile" in impls:
        torch._dynamo.reset()
        compile_clock[0] += impls["compile"].first_call_s
    for impl, result in results.items():
        if isinstance(result, Timing):
            row = _row(case, size, impl, device, dtype, "ok", result, floor_bytes=workload.floor_bytes,
                       copy_gbps=copy_gbps)
        else:
            row = _row(case, size, impl, device, dtype, "n/a" if impl == "compile" else "failed",
                       reason=_reason(result))
        if workload.note:
            row["note"] = workload.note
        rows.append(row)
        shown = f"{row['median_s'] * 1e3:10.3f} ms" if row["status"] == "ok" else row["status"]
        log(f"{case.name:<13} {size.label():<28} {impl:<9} {shown} {row.get('reason', '')}")
    return rows

def run_suite(preset: str = "quick", device=None, *, dtype: torch.dtype = torch.float32,
              compile: bool | None = None, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Measure every case of ``preset`` on ``device``; returns the report (see validate_report).

    ``cases``: only these registry cases; ``progress``: a tqdm bar over the (case, size) pairs
    with one line per measured row.
    """
    config = get_preset(preset)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    if cases is not None:
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            raise ValueError(f"cases must be among {sorted(CASES)}, got unknown {unknown}")
    compile = config.compile if compile is None else compile
    log = tqdm.write if progress else (lambda _msg: None)
    started = time.perf_counter()
    # On a GPU the copy must be far larger than L2 to measure DRAM bandwidth.
    copy_gbps = copy_bandwidth(device, config.copy_bytes if device.type == "cpu" else 1 << 30)
    log(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s")
    pairs = [(case, size) for case, size in iter_cases(preset) if cases is None or case.name in cases]
    rows, compile_clock = [], [0.0]
    for case, size in tqdm(pairs, desc=f"bench {preset}", unit="size", disable=not progress):
        rows += _case_rows(case, size, device, dtype, config, compile, copy_gbps, compile_clock, log)
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": run_metadata(preset, device, dtype, compile, config, copy_gbps,
                                 time.perf_counter() - started),
        "rows": rows,
        "ratios": compute_ratios(rows),
    }
