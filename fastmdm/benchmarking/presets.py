"""Benchmark presets: the sizes of every case and the time allowed to each measurement."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .cases import CASES, Case, Size

PRESETS = ("tiny", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes per case and the time allowed to each measurement and to torch.compile."""

    name: str
    sizes: dict[str, tuple[Size, ...]]
    budget_s: float  # time spent sampling one (case, size, impl)
    min_samples: int
    max_samples: int
    compile: bool
    compile_budget_s: float  # total compile time after which compile rows become "n/a"
    copy_bytes: int
    compile_cases: tuple[str, ...] | None = None  # cases with a compile column (None: all)


def _grid(Bs, Ks, ds, **extra) -> tuple[Size, ...]:
    ext = tuple(sorted(extra.items()))
    return tuple(Size(B, K, d, ext) for B in Bs for K in Ks for d in ds)


PRESET_CONFIGS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        sizes={
            "transition": _grid([4], [2], [1]),
            "perturb": _grid([4], [2], [3]),
            "perturb_data": _grid([4], [2], [3]),
            "dsm_loss": _grid([4], [2], [3]),
            "hutchinson": _grid([4], [2], [3], probes=2),
            "sampler_step": _grid([4], [2], [3], steps=1),
            "sample_run": _grid([4], [2], [3], steps=2),
            "train_step": _grid([4], [2], [3]),
        },
        budget_s=0.01, min_samples=3, max_samples=5, compile=False, compile_budget_s=0.0,
        copy_bytes=1 << 20,
    ),
    "quick": Preset(
        name="quick",
        sizes={
            "transition": _grid([512], [2, 3, 6], [1]),
            "perturb": _grid([512], [3], [2, 784]),
            "perturb_data": _grid([512], [3], [784, 3072]),
            "dsm_loss": _grid([512], [3], [2, 784]),
            "hutchinson": _grid([128], [3], [2], probes=8) + _grid([64], [3], [784], probes=4),
            "sampler_step": _grid([512], [3], [2, 784], steps=1),
            "sample_run": _grid([128], [3], [2], steps=20),
            "train_step": _grid([256], [3], [2, 784]),
        },
        budget_s=1.0, min_samples=7, max_samples=200, compile=True, compile_budget_s=100.0,
        copy_bytes=64 << 20, compile_cases=("perturb_data",),
    ),
    "full": Preset(
        name="full",
        sizes={
            "transition": _grid([64, 512, 4096], [1, 2, 3, 6], [1]),
            "perturb": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]) + _grid([128], [2, 3], [3072]),
            "perturb_data": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]),
            "dsm_loss": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]),
            "hutchinson": _grid([64, 512], [3], [2, 784], probes=8),
            "sampler_step": _grid([512, 4096], [2, 3], [2, 784, 3072], steps=1),
            "sample_run": _grid([512], [2, 3], [2, 784], steps=100),
            "train_step": _grid([512], [3], [2, 784, 3072]),
        },
        budget_s=1.0, min_samples=10, max_samples=500, compile=True, compile_budget_s=1200.0,
        copy_bytes=256 << 20, compile_cases=("transition", "perturb", "perturb_data", "dsm_loss"),
    ),
}


def iter_cases(preset: str) -> Iterator[tuple[Case, Size]]:
    """Every (case, size) of a preset, in registry order (cases absent from CASES are skipped)."""
    config = get_preset(preset)
    for name, case in CASES.items():
        for size in config.sizes.get(name, ()):
            yield case, size


def get_preset(preset: str) -> Preset:
    """The configuration of ``preset``; ValueError naming the presets if it is unknown."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return PRESET_CONFIGS[preset]
