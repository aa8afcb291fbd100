"""Benchmark suite: every fastmdm fast path against the published recipe, looped and batched.

- :mod:`.cases`    -- the one case registry :data:`CASES` (what each row runs);
- :mod:`.presets`  -- sizes per case for the tiny, quick and full presets;
- :mod:`.timing`   -- the one timer (interleaved samples, median and IQR, copy bandwidth);
- :mod:`.suite`    -- :func:`run_suite`: rows per (case, size, implementation) and ratios;
- :mod:`.schema`   -- the report's JSON schema (checked with jsonschema) and :func:`validate_report`;
- :mod:`.metadata` -- date, command, versions and device of a run;
- :mod:`.report`   -- Markdown rendering, targets, :func:`write_report` and :func:`run_bench`
  (``fastmdm bench``: ``bench-<date>-<device>-<preset>.json`` plus a Markdown report).
"""

from .cases import CASES, T_LOW, Case, CaseSkipped, Size, Workload, bench_diffusion
from .presets import PRESET_CONFIGS, PRESETS, Preset, get_preset, iter_cases
from .report import ratio_table, render_markdown, run_bench, target_summary, write_report
from .schema import IMPLS, SCHEMA, SCHEMA_VERSION, params_key, validate_report
from .suite import compute_ratios, implementations, run_suite
from .timing import Timing, copy_bandwidth, forced_backend, measure, measure_interleaved

__all__ = [
    "CASES", "IMPLS", "PRESETS", "PRESET_CONFIGS", "SCHEMA", "SCHEMA_VERSION", "T_LOW", "Case", "CaseSkipped",
    "Preset", "Size", "Timing", "Workload", "bench_diffusion", "compute_ratios", "copy_bandwidth",
    "forced_backend", "get_preset", "implementations", "iter_cases", "measure", "measure_interleaved",
    "params_key", "ratio_table", "render_markdown", "run_bench", "run_suite", "target_summary",
    "validate_report", "write_report",
]
