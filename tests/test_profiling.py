"""Profiling: stage ranges on CPU and the traces written by run_profile."""

import pytest
import torch

from fastmdm import cli_profile, stages


def test_stage_is_transparent_outside_a_profiler():
    x = torch.arange(4.0)
    with stages.stage("outer"):
        with stages.stage("inner") as inner:
            y = x * 2
    assert torch.equal(y, x * 2)
    assert inner.label == "fastmdm.inner"
    with pytest.raises(KeyError):
        with stages.stage("raising"):
            raise KeyError("propagates")


def test_stage_names_a_range_while_profiling():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with stages.stage("unit_test_stage"):
            torch.ones(8).sum()
    keys = {event.key for event in prof.key_averages()}
    assert "fastmdm.unit_test_stage" in keys


STAGES = {  # the workload's own range, and stages named inside fastmdm
    "train": {"fastmdm.train_step", "fastmdm.train.loss", "fastmdm.train.backward", "fastmdm.elbo.integrand",
              "fastmdm.perturb", "fastmdm.transition"},
    "sample": {"fastmdm.sample", "fastmdm.sample.plan", "fastmdm.sample.network"},
    "elbo": {"fastmdm.elbo.integrand", "fastmdm.elbo.tmin_offset", "fastmdm.elbo.prior"},
}


@pytest.mark.parametrize("what", sorted(STAGES))
def test_run_profile_writes_a_chrome_trace_and_ranks_ops(tmp_path, what, capsys):
    result = cli_profile.run_profile(what, tmp_path, "cpu", steps=1, batch=16)
    trace = cli_profile.load_trace(result["trace"])
    names = {event.get("name") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names if name)
    top = result["top"]
    assert 0 < len(top) <= 10
    times = [row["self_time_us"] for row in top]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    assert not any(row["name"].startswith("fastmdm.") for row in top)
    assert "top" in capsys.readouterr().out
    assert STAGES[what] <= names


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="what"):
        cli_profile.run_profile("infer", tmp_path, "cpu")
    with pytest.raises(ValueError, match="steps"):
        cli_profile.run_profile("elbo", tmp_path, "cpu", steps=0)
    with pytest.raises(ValueError, match="not a Chrome trace"):
        (tmp_path / "x.json").write_text("[]")
        cli_profile.load_trace(tmp_path / "x.json")


def test_top_ops_ranks_by_self_time_and_keeps_only_kernels_for_device_time():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with stages.stage("ranked"):
            a = torch.randn(64, 64)
            for _ in range(3):
                a = a @ a / 64
    top = cli_profile.top_ops(prof, n=3)
    assert len(top) == 3 and top[0]["self_time_us"] >= top[-1]["self_time_us"]
    assert all(not row["name"].startswith("fastmdm.") for row in top)
    assert cli_profile.top_ops(prof, device_time=True) == []  # a CPU-only trace has no device kernels


def test_stages_do_not_break_compiled_graphs():
    from torch._dynamo.testing import CompileCounter

    @stages.staged("outer")
    def fn(x):
        with stages.stage("inner"):
            return x.sin() * 2

    counter = CompileCounter()
    x = torch.randn(4)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend=counter)(x), fn(x))
    assert counter.frame_count == 1  # one graph: no break at the stage boundaries
