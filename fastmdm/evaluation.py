"""Evaluation of a trained :class:`~fastmdm.training.MDM`: bits per dim over a data set in batches,
with the standard error of the mean (docs/math.md §4, §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .training import MDM


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error s/√n (float64)."""
    v = values.to(torch.float64)
    se = v.std(unbiased=True).item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return v.mean().item(), se


def evaluate_bpd(mdm: MDM, x: Tensor, method: str = "elbo", batch_size: int = 256, repeats: int = 1,
                 seed: int = 0, progress: bool = False, **ode_kwargs) -> tuple[float, float, Tensor]:
    """Bits per dim over a data set in batches: (mean, standard error, per-sample values);
    ``progress`` shows a tqdm bar over the examples with the estimated time left and the network
    evaluations of the batch in progress."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    values = []
    with tqdm(total=x.shape[0], desc=f"{method} bpd", unit="example", disable=not progress) as bar:
        nfe = [0]

        def count(*_):
            nfe[0] += 1
            bar.set_postfix(nfe=nfe[0])

        hook = mdm.score_model.register_forward_hook(count) if progress else None
        try:
            for i in range(0, x.shape[0], batch_size):
                nfe[0] = 0
                values.append(mdm.bpd(x[i: i + batch_size], method, generator, repeats, **ode_kwargs))
                bar.update(values[-1].shape[0])
        finally:
            if hook is not None:
                hook.remove()
    per_sample = torch.cat(values)
    return (*mean_and_stderr(per_sample), per_sample)


__all__ = ["evaluate_bpd", "mean_and_stderr"]
