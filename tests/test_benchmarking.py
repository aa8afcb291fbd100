"""The benchmark harness: the tiny preset's report, its schema, and ratios from the same run."""

import copy
import json
import math

import pytest
import torch

from fastmdm import benchmarking as bm


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny-preset run on CPU (every case), written to a fresh directory."""
    report = bm.run_suite("tiny", "cpu", progress=False)
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = bm.write_report(report, out)
    return report, json_path, md_path


def test_tiny_report_is_valid_json_and_markdown(tiny_run):
    report, json_path, md_path = tiny_run
    loaded = json.loads(json_path.read_text())
    bm.validate_report(loaded)
    assert loaded == json.loads(json.dumps(report))
    meta = loaded["metadata"]
    assert meta["preset"] == "tiny" and meta["device"]["type"] == "cpu"
    assert meta["versions"]["torch"] == torch.__version__
    assert any("No GPU" in note for note in meta["notes"])
    assert json_path.name == f"bench-{meta['date'][:10]}-cpu-tiny.json"
    md = md_path.read_text()
    assert meta["command"] in md and meta["device"]["name"] in md
    for case in bm.PRESET_CONFIGS["tiny"].sizes:
        if case in bm.CASES:
            assert f"| {case} |" in md


def test_every_case_yields_a_measured_or_explained_row(tiny_run):
    report, _, _ = tiny_run
    fast = {row["case"]: row for row in report["rows"] if row["impl"] == "fast"}
    assert set(fast) == set(bm.CASES)
    for row in report["rows"]:
        assert row["status"] == "ok" or row["reason"]
        assert (row["B"], row["K"], row["d"]) == (4, 2, 1 if row["case"] == "transition" else 3)
    for case in ("transition", "perturb", "dsm_loss"):
        assert fast[case]["status"] == "ok"
        assert fast[case]["floor_bytes"] > 0


def test_ratios_are_quotients_of_the_same_runs_medians(tiny_run):
    report, _, _ = tiny_run
    medians = {(r["case"], r["impl"]): r["median_s"] for r in report["rows"] if r["status"] == "ok"}
    assert report["ratios"]
    for ratio in report["ratios"]:
        case = ratio["case"]
        assert ratio["fast_over_reference"] == medians[(case, "fast")] / medians[(case, "reference")]
        if case in ("transition", "perturb", "dsm_loss", "sampler_step", "train_step"):
            assert ratio["fast_over_batched"] == medians[(case, "fast")] / medians[(case, "batched")]
        assert ratio["fast_over_torch"] is None  # on CPU the fast path is the torch path
        assert ratio["fast_over_compile"] is None  # the tiny preset leaves torch.compile out


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: r["ratios"][0].update(fast_over_reference=r["ratios"][0]["fast_over_reference"] * 1.1),
         "quotient"),
        (lambda r: r["metadata"].pop("command"), "command"),
        (lambda r: r["metadata"]["versions"].pop("torch"), "torch"),
        (lambda r: r["rows"][0].update(impl="numpy"), "impl"),
        (lambda r: r["rows"][0].update(median_s=0.0), "median_s"),
        (lambda r: r["rows"][0].update(status="failed", reason=""), "reason"),
        (lambda r: r["ratios"][0].update(fast_over_compile=1.0), "no ok row"),
        (lambda r: r["ratios"][0].update(fast_over_batched=r["ratios"][0]["fast_over_batched"] * 2),
         "quotient"),
        (lambda r: r["ratios"][0].pop("fast_over_batched"), "fast_over_batched"),
        (lambda r: r["rows"][0].update(B=0), "B"),
        (lambda r: r["metadata"].update(preset="huge"), "preset"),
        (lambda r: r.update(schema_version=1), "schema_version"),
        (lambda r: r.update(rows=[]), "rows"),
    ],
)
def test_validator_rejects_a_broken_report(tiny_run, corrupt, message):
    report = copy.deepcopy(tiny_run[0])
    corrupt(report)
    with pytest.raises(ValueError, match=message):
        bm.validate_report(report)


def _fake_rows():
    base = {"case": "c", "device": "cpu", "dtype": "float32", "B": 2, "K": 1, "d": 3, "extra": {},
            "iqr_s": 0.0, "n": 5, "number": 1, "memory_bound": False}
    return [
        {**base, "impl": "fast", "status": "ok", "median_s": 2.0},
        {**base, "impl": "reference", "status": "ok", "median_s": 8.0},
        {**base, "impl": "torch", "status": "failed", "median_s": None, "reason": "boom"},
        {**base, "impl": "compile", "status": "ok", "median_s": 1.0},
        {**base, "impl": "reference", "d": 4, "status": "ok", "median_s": 1.0},  # no fast row: no ratio
    ]


def test_compute_ratios_uses_only_ok_rows_of_the_same_size():
    (ratio,) = bm.compute_ratios(_fake_rows())
    assert ratio["params"] == {"B": 2, "K": 1, "d": 3}
    assert ratio["fast_over_reference"] == 0.25
    assert ratio["fast_over_torch"] is None
    assert ratio["fast_over_compile"] == 2.0


def test_measure_calls_the_function_and_summarises_samples():
    calls = []
    timing = bm.measure(lambda: calls.append(1), "cpu", budget_s=1.0, min_samples=3, max_samples=4,
                        min_sample_s=0.0)
    assert timing.n == 4 and timing.number == 1  # the budget would allow more: capped
    assert len(calls) == 2 + timing.n * timing.number  # warm-up, estimate, samples
    assert timing.median_s > 0 and timing.iqr_s >= 0
    with pytest.raises(ValueError, match="min_samples"):
        bm.measure(lambda: None, "cpu", min_samples=1)


def test_measure_interleaved_alternates_and_isolates_failures():
    order = []

    def broken():
        raise RuntimeError("c broke")

    results = bm.measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                                      "c": broken}, "cpu", budget_s=1.0, min_samples=3, max_samples=4,
                                     min_sample_s=0.0)
    assert list(results) == ["a", "b", "c"]
    assert isinstance(results["c"], RuntimeError)
    assert results["a"].n == results["b"].n == 4
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up and estimate of each
    assert order[4:] == ["a", "b"] * 4  # then one sample of each per round


def test_copy_bandwidth_is_a_positive_rate():
    gbps = bm.copy_bandwidth("cpu", nbytes=1 << 20, budget_s=0.01)
    assert math.isfinite(gbps) and gbps > 0


def _register(monkeypatch, name, build):
    monkeypatch.setitem(bm.CASES, name, bm.Case(name, "test case", build))
    monkeypatch.setitem(bm.PRESET_CONFIGS["tiny"].sizes, name, (bm.Size(2, 1, 3),))


def _workload(reference=None):
    x = torch.randn(2, 3)
    return bm.Workload(torch_path=lambda: x * 2, reference=reference or (lambda: x + x))


def test_skipped_failed_and_unavailable_compile_rows_carry_reasons(monkeypatch):
    def missing(size, device, dtype):
        raise bm.CaseSkipped("fastmdm.nothing is not available")

    def broken_reference():
        raise RuntimeError("reference exploded")

    _register(monkeypatch, "missing", missing)
    _register(monkeypatch, "broken", lambda size, device, dtype: _workload(broken_reference))
    _register(monkeypatch, "works", lambda size, device, dtype: _workload())
    monkeypatch.setattr(torch, "compile", lambda fn: (_ for _ in ()).throw(RuntimeError("no compiler")))
    report = bm.run_suite("tiny", "cpu", compile=True, cases=["missing", "broken", "works"], progress=False)
    bm.validate_report(report)
    rows = {(r["case"], r["impl"]): r for r in report["rows"]}
    assert rows[("missing", "fast")]["status"] == "skipped"
    assert "fastmdm.nothing" in rows[("missing", "fast")]["reason"]
    assert rows[("broken", "reference")]["status"] == "failed"
    assert "reference exploded" in rows[("broken", "reference")]["reason"]
    assert rows[("works", "fast")]["status"] == "ok"
    assert rows[("works", "compile")]["status"] == "n/a"
    ratios = {r["case"]: r for r in report["ratios"]}
    assert ratios["broken"]["fast_over_reference"] is None
    assert ratios["works"]["fast_over_reference"] > 0


def test_compile_rows_stop_when_the_compile_budget_is_spent(monkeypatch):
    _register(monkeypatch, "works", lambda size, device, dtype: _workload())
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the tiny preset's compile budget is 0 s
    report = bm.run_suite("tiny", "cpu", compile=True, cases=["works"], progress=False)
    (row,) = [r for r in report["rows"] if r["impl"] == "compile"]
    assert row["status"] == "n/a" and "budget" in row["reason"]


def test_run_bench_prints_the_table_and_writes_both_files(monkeypatch, tmp_path, capsys):
    _register(monkeypatch, "works", lambda size, device, dtype: _workload())
    report = bm.run_bench("tiny", "cpu", tmp_path, cases=["works"])
    printed = capsys.readouterr().out
    assert "| works |" in printed and "fast/ref" in printed
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    bm.validate_report(report)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="preset"):
        bm.run_suite("huge", "cpu", progress=False)
    with pytest.raises(ValueError, match="cases"):
        bm.run_suite("tiny", "cpu", cases=["nope"], progress=False)


def test_targets_are_checked_only_on_gpu_reports(tiny_run):
    report = copy.deepcopy(tiny_run[0])
    assert bm.target_summary(report)[0].startswith("Not evaluated")
    assert "Not evaluated" in bm.render_markdown(report)
    report["metadata"]["device"]["type"] = "cuda"
    perturb = next(r for r in report["rows"] if r["case"] == "perturb" and r["impl"] == "fast")
    perturb["fraction_of_copy"] = 0.3
    ratio = next(r for r in report["ratios"] if r["case"] == "transition")
    ratio["fast_over_reference"] = 2.0
    for row in report["rows"]:  # everything else on target
        if row is not perturb and "fraction_of_copy" in row:
            row["fraction_of_copy"] = 0.9
    for other in report["ratios"]:
        if other is not ratio:
            other["fast_over_reference"] = 0.5
    report["metadata"]["copy_bandwidth_gbps"] = 1e-6  # every row large enough to be bandwidth-bound
    misses = bm.target_summary(report)
    assert len(misses) == 2
    assert "perturb" in misses[0] and "30%" in misses[0]
    assert "transition" in misses[1] and "not ahead" in misses[1]
    report["metadata"]["copy_bandwidth_gbps"] = 1e6  # tiny rows: launch-bound, bandwidth not checked
    lines = bm.target_summary(report)
    assert len(lines) == 2 and "not ahead" in lines[0] and "not checked" in lines[1]


def test_batched_baseline_computes_what_the_looped_reference_does():
    """reference(..., batched=True) runs the same recipe without the loop: same numbers (float64)."""
    from fastmdm import reference

    diff = bm.bench_diffusion(3, "cpu")
    args = dict(beta_min=diff.beta_min, beta_max=diff.beta_max, init_aux_var=diff.init_aux_var,
                stationary_var=diff.stationary_var, dtype=torch.float64)
    Q, D = diff.Q.detach(), diff.D.detach()
    g = torch.Generator().manual_seed(7)
    t = bm.T_LOW + (1 - bm.T_LOW) * torch.rand(5, dtype=torch.float64, generator=g)
    x0 = torch.randn(5, 4, dtype=torch.float64, generator=g)
    eps_hat, eps = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g)
    for looped, batched in zip(reference.transition(Q, D, t, **args),
                               reference.transition(Q, D, t, batched=True, **args), strict=True):
        torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    runs = [reference.perturb(Q, D, x0, t, generator=torch.Generator().manual_seed(1), batched=b, **args)
            for b in (False, True)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.dsm_loss_weighted(eps_hat, eps, t, Q, D, batched=True, **args),
                               reference.dsm_loss_weighted(eps_hat, eps, t, Q, D, **args), rtol=1e-12, atol=0)

    def model(u, t):
        return torch.tanh(u) * t[:, None, None]

    samples = [reference.euler_maruyama_sample(model, Q, D, (5, 4), steps=4, t_min=diff.t_min,
                                               generator=torch.Generator().manual_seed(2), batched=b, **args)
               for b in (False, True)]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-12, atol=1e-12)


def test_the_schema_is_a_valid_json_schema_that_the_tiny_report_meets(tiny_run):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(bm.SCHEMA)
    jsonschema.validate(json.loads(tiny_run[1].read_text()), bm.SCHEMA)
