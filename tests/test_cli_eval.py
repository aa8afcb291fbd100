"""``fastmdm eval`` defaults (quick, with progress and a pointer to --full); optional extras checked first."""

import json
import sys

import pytest
import torch

from fastmdm.cli import EVAL_ODE_N, EVAL_RTOL, FULL_RTOL, _eval_settings, build_parser, main

TOY = ["--data", "moons", "--diffusion", "vpsde", "--width", "8", "--batch-size", "16", "--eval-every", "100",
       "--eval-size", "8", "--samples", "4", "--sample-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("eval") / "run")
    assert main(["train", "--steps", "2", "--out", run, *TOY]) == 0
    return run


def test_eval_defaults_are_quick_and_say_how_to_run_the_full_evaluation(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", tiny_run, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ode"]["n"] == EVAL_ODE_N and result["ode"]["rtol"] == EVAL_RTOL and result["ode"]["mode"] == "vjp"
    assert result["elbo"]["n"] == result["n"] > EVAL_ODE_N  # the ELBO on every example
    for method in ("elbo", "ode"):
        assert result[method]["ci95"][0] < result[method]["bpd"] < result[method]["ci95"][1]
    captured = capsys.readouterr()
    assert f"n={EVAL_ODE_N} of {result['n']}" in captured.out and "--full" in captured.out
    assert "ode bpd" in captured.err and "example" in captured.err  # the progress bars
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert f"on the first {EVAL_ODE_N}" in usage and f"at rtol {EVAL_RTOL:g}" in usage and "--full" in usage


def test_full_and_explicit_settings():
    parse, cpu = build_parser().parse_args, torch.device("cpu")
    quick = _eval_settings(parse(["eval", "--ckpt", "x"]), 400, cpu)
    assert quick["ode"][0] == EVAL_ODE_N and quick["ode"][2]["rtol"] == EVAL_RTOL and quick["elbo"][0] == 400
    full = _eval_settings(parse(["eval", "--ckpt", "x", "--full"]), 400, cpu)
    assert full["ode"][0] == 400 and full["ode"][2] == {"rtol": FULL_RTOL, "atol": FULL_RTOL, "mode": "vjp"}
    assert _eval_settings(parse(["eval", "--ckpt", "x"]), 400, torch.device("cuda"))["ode"][2]["mode"] == "jvp"
    asked = _eval_settings(parse(["eval", "--ckpt", "x", "--full", "--rtol", "1e-4", "--ode-n", "10"]), 400, cpu)
    assert asked["ode"][0] == 10 and asked["ode"][2]["rtol"] == 1e-4
    assert _eval_settings(parse(["eval", "--ckpt", "x", "--ode-n", "0"]), 7, cpu)["ode"][0] == 7


@pytest.mark.parametrize("module, args, extra", [
    ("matplotlib", ["train", "--steps", "2", *TOY], "plot"),
    ("sklearn", ["train", "--steps", "2", *TOY[2:], "--data", "digits"], "data"),
])
def test_a_missing_extra_exits_2_with_one_line_before_any_work(module, args, extra, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'pip install "fastmdm[{extra}]"' in err
    assert not run.exists()  # nothing was written


def test_eval_checks_the_data_extra(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ckpt", tiny_run, "--data", "digits"])
    assert exit_info.value.code == 2 and 'pip install "fastmdm[data]"' in capsys.readouterr().err
