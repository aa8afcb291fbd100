"""The report's JSON schema, checked with jsonschema, plus the checks a schema cannot state.

A report is ``{"schema_version", "metadata", "rows", "ratios"}``: one row per (case, size,
implementation) with the median and inter-quartile range of the per-call time (or the
reason it was not measured), and one ratio entry per (case, size) with fast / other median
for every other implementation measured. Beyond the schema, :func:`validate_report` checks
that every ratio is the quotient of the same report's medians and that every bandwidth is
floor_bytes / median.
"""

from __future__ import annotations

import math

import jsonschema

from .presets import PRESETS

SCHEMA_VERSION = 2  # 2: the "batched" implementation and its fast_over_batched ratio
IMPLS = ("fast", "torch", "compile", "batched", "reference")
STATUSES = ("ok", "skipped", "failed", "n/a")
RATIO_FIELDS = tuple(f"fast_over_{impl}" for impl in IMPLS if impl != "fast")

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_OPTIONAL_STRING = {"type": ["string", "null"]}
_METADATA = {
    "type": "object",
    "required": ["date", "command", "preset", "versions", "device", "cpu_count", "copy_bandwidth_gbps",
                 "notes"],
    "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"},
        "command": {"type": "string"},
        "preset": {"enum": list(PRESETS)},
        "versions": {
            "type": "object",
            "required": ["python", "torch", "triton", "fastmdm"],
            "additionalProperties": _OPTIONAL_STRING,
        },
        "device": {"type": "object", "required": ["type", "name"],
                   "properties": {"type": {"type": "string"}, "name": {"type": "string"}}},
        "cpu_count": _POSITIVE_INT,
        "copy_bandwidth_gbps": {"type": "number", "exclusiveMinimum": 0},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}
_ROW = {
    "type": "object",
    "required": ["case", "impl", "device", "dtype", "B", "K", "d", "extra", "status", "median_s", "iqr_s",
                 "n"],
    "properties": {
        "case": {"type": "string"},
        "impl": {"enum": list(IMPLS)},
        "device": {"type": "string"},
        "dtype": {"type": "string"},
        "B": _POSITIVE_INT,
        "K": _POSITIVE_INT,
        "d": _POSITIVE_INT,
        "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
        "status": {"enum": list(STATUSES)},
        "median_s": {"type": ["number", "null"]},
        "iqr_s": {"type": ["number", "null"]},
        "n": {"type": "integer", "minimum": 0},
        "floor_bytes": _POSITIVE_INT,
        "gbps": {"type": "number"},
    },
    "dependentRequired": {"gbps": ["floor_bytes"]},
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {"properties": {"median_s": {"type": "number", "exclusiveMinimum": 0},
                            "iqr_s": {"type": "number", "minimum": 0},
                            "n": {"minimum": 2}}},
    "else": {"required": ["reason"], "properties": {"reason": {"type": "string", "minLength": 1}}},
}
_RATIO = {
    "type": "object",
    "required": ["case", "params", "dtype", *RATIO_FIELDS],
    "properties": {
        "case": {"type": "string"},
        "params": {"type": "object", "required": ["B", "K", "d"],
                   "additionalProperties": {"type": "integer"}},
        "dtype": {"type": "string"},
        **{field: {"type": ["number", "null"], "exclusiveMinimum": 0} for field in RATIO_FIELDS},
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fastmdm benchmark report",
    "type": "object",
    "required": ["schema_version", "metadata", "rows", "ratios"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "metadata": _METADATA,
        "rows": {"type": "array", "minItems": 1, "items": _ROW},
        "ratios": {"type": "array", "items": _RATIO},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def params_key(row: dict) -> tuple:
    """(case, B, K, d, sorted extras, dtype): the rows of one report line share it."""
    return (row["case"], row["B"], row["K"], row["d"], tuple(sorted(row["extra"].items())), row["dtype"])


def validate_report(report: dict, rel_tol: float = 1e-9) -> None:
    """Raise ValueError naming the first field that breaks the schema or the same-run arithmetic.

    The schema (:data:`SCHEMA`, checked by jsonschema) fixes fields, types, the known cases'
    implementations and statuses, sizes >= 1, ok rows with median > 0, IQR >= 0 and n >= 2, and
    a reason on every other row; then every ``gbps`` must equal floor_bytes / median_s and every
    ratio the quotient of the same report's ok medians.
    """
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(report))
    if error is not None:
        where = "report" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise ValueError(f"{where}: {error.message}")
    medians = {}
    for i, row in enumerate(report["rows"]):
        if row["status"] != "ok":
            continue
        if "gbps" in row and not math.isclose(row["gbps"], row["floor_bytes"] / row["median_s"] / 1e9,
                                              rel_tol=rel_tol):
            raise ValueError(f"report.rows[{i}].gbps != floor_bytes / median_s")
        medians[(params_key(row), row["impl"])] = row["median_s"]
    for i, ratio in enumerate(report["ratios"]):
        where = f"report.ratios[{i}]"
        params = dict(ratio["params"])
        key = (ratio["case"], params.pop("B"), params.pop("K"), params.pop("d"),
               tuple(sorted(params.items())), ratio["dtype"])
        fast = medians.get((key, "fast"))
        if fast is None:
            raise ValueError(f"{where} has no ok 'fast' row in the same report")
        for field in RATIO_FIELDS:
            other, value = medians.get((key, field.removeprefix("fast_over_"))), ratio[field]
            if other is None:
                if value is not None:
                    raise ValueError(f"{where}.{field} is set but the run has no ok row for it")
            elif value is None or not math.isclose(value, fast / other, rel_tol=rel_tol):
                raise ValueError(f"{where}.{field} = {value!r} is not the quotient of the medians "
                                 f"{fast!r} / {other!r}")
