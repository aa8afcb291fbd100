"""`fastmdm gpu-check` off a GPU: the no-CUDA exit, and the report from stand-in checks."""

import json

import pytest
import torch

from fastmdm import gpu_check
from fastmdm.cli import main as cli_main


def test_without_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["gpu-check", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [gpu_check.NO_CUDA]
    assert list(tmp_path.iterdir()) == []


def _boom(out):
    raise RuntimeError("capture failed")


def test_report_records_every_check_and_fails_on_one_failure(tmp_path, capsys):
    seen = []
    checks = {
        "passes": lambda out: seen.append(out) or {"status": "passed", "detail": "12 passed"},
        "skips": lambda out: {"status": "skipped", "detail": "no tests found"},
        "crashes": _boom,
    }
    code = gpu_check.main(tmp_path, checks=checks, cuda_available=lambda: True)
    assert code == 1 and seen == [tmp_path]
    (json_path,) = tmp_path.glob("gpu-check-*.json")
    report = json.loads(json_path.read_text())
    assert not report["ok"]
    rows = {r["check"]: r for r in report["checks"]}
    assert [r["status"] for r in rows.values()] == ["passed", "skipped", "failed"]
    assert rows["crashes"]["detail"] == "RuntimeError: capture failed"
    assert all(r["seconds"] >= 0 for r in rows.values())
    md = json_path.with_suffix(".md").read_text()
    assert "FAILED" in md and "| crashes | failed |" in md and "12 passed" in md
    assert "wrote" in capsys.readouterr().out


def test_all_passing_checks_exit_0(tmp_path):
    checks = {"a": lambda out: {"status": "passed"}, "b": lambda out: {"status": "skipped"}}
    assert gpu_check.main(tmp_path, checks=checks, cuda_available=lambda: True) == 0
    (md,) = tmp_path.glob("gpu-check-*.md")
    assert "all checks passed" in md.read_text()


def test_a_check_with_an_unknown_status_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="status 'ok'"):
        gpu_check.run_checks(tmp_path, {"bad": lambda out: {"status": "ok"}})


def test_the_captured_sampler_loop_runs_on_the_torch_path():
    loop, u0 = gpu_check.fixed_grid_loop("cpu", steps=3, batch=2, dim=4)
    out = loop(u0)
    assert out.shape == u0.shape == (2, 2, 4) and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager():
    assert gpu_check.graph_replay(steps=4, batch=8, dim=64)["status"] == "passed"


def test_kernel_tests_leave_out_the_transition_kernel_above_its_register_limit():
    pytest.importorskip("triton", reason="triton is not importable")
    from fastmdm.kernels.common import TRANSITION_MAX_K

    expr = gpu_check.unlaunched_transition_tests()
    assert f"not malda{TRANSITION_MAX_K + 1}" in expr and "not learned8" in expr
    assert f"malda{TRANSITION_MAX_K} " not in expr + " "
