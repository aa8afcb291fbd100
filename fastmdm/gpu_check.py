"""`fastmdm gpu-check`: everything that needs a GPU, in one command, into one report.

Four checks, each in a fresh subprocess with its own time limit (about four minutes in all):

1. the Triton kernel tests (tests/test_kernels_*.py) on CUDA, each against the torch path;
2. the quick benchmark (`fastmdm bench --preset quick`);
3. a profiler trace of training steps (`fastmdm profile --what train`);
4. a CUDA-graph capture of a fixed-grid sampler loop (ancestral plan, fused ``sde_step``),
   replayed and compared with the eager loop (same seeds, so the results must be equal).

Writes benchmarks/results/gpu-check-<date>.json and .md. Without CUDA it runs nothing and
exits 2 with one line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "fastmdm gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing was run"
STATUSES = ("passed", "failed", "skipped")


def _run(cmd: list[str], timeout_s: float) -> tuple[str, str]:
    """(status, last lines of output) of a subprocess run from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "failed", f"timeout after {timeout_s:g} s\n{out[-1500:]}"
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
    return ("passed" if res.returncode == 0 else "failed"), tail


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from fastmdm.cli import main; sys.exit(main())", *args]


def unlaunched_transition_tests() -> str:
    """pytest -k expression leaving out the transition kernel's direct tests at K above
    TRANSITION_MAX_K (diffusions named malda<K>, learned<K>): the package sends those K to the
    torch path, and compiling the per-lane kernel there takes minutes."""
    from .kernels.common import MAX_K, TRANSITION_MAX_K

    return " and ".join(f"not {name}{K}" for name in ("malda", "learned")
                        for K in range(TRANSITION_MAX_K + 1, MAX_K + 1))


def check_kernel_tests(out: Path) -> dict:
    """pytest on tests/test_kernels_*.py with CUDA tensors (no TRITON_INTERPRET)."""
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py"))
    if not tests:
        return {"status": "skipped", "detail": f"no tests/test_kernels_*.py under {REPO}"}
    status, tail = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                         "-k", unlaunched_transition_tests()], timeout_s=150)
    return {"status": status, "detail": tail.splitlines()[-1] if status == "passed" else tail}


def check_quick_bench(out: Path) -> dict:
    """`fastmdm bench --preset quick --device cuda`, its report next to this one."""
    status, tail = _run(_cli("bench", "--preset", "quick", "--device", "cuda", "--out", str(out)),
                        timeout_s=120)
    return {"status": status, "detail": tail}


def check_profile(out: Path) -> dict:
    """`fastmdm profile --what train --device cuda`: a Chrome trace and the top kernels."""
    status, tail = _run(_cli("profile", "--what", "train", "--device", "cuda", "--out", str(out)),
                        timeout_s=60)
    return {"status": status, "detail": tail}


def fixed_grid_loop(device, steps: int = 16, batch: int = 64, dim: int = 256):
    """(loop, u0): a fixed-grid sampler loop on ``device`` — ancestral coefficients for the CLD,
    a fixed linear network, the fused step drawing its noise from device-side seeds — and its
    start state. No host synchronisation inside ``loop``, so it can be captured."""
    import fastmdm as fm
    from fastmdm.sde_step import sde_step
    from fastmdm.solvers import ancestral_plan

    diffusion = fm.cld()
    times = torch.linspace(diffusion.T, diffusion.t_min, steps + 1, dtype=torch.float64)
    plan = ancestral_plan(diffusion, times)
    K = plan.phi.shape[-1]
    zeros = torch.zeros_like(plan.phi)
    lam = plan.lam if plan.lam is not None else zeros
    noise = plan.noise if plan.noise is not None else zeros
    coefs = torch.cat([torch.stack([plan.phi, noise, lam], 1), plan.gamma[:, :1]], 1).to(device)
    gen = torch.Generator(device).manual_seed(0)
    seeds = torch.randint(0, 2**31 - 1, (steps,), device=device, generator=gen)
    weight = torch.randn(K * dim, K * dim, device=device, generator=gen) / (K * dim) ** 0.5
    t_eval = plan.eval_times.to(device=device, dtype=torch.float32)

    def loop(u):
        for n in range(steps):
            eps = (u.flatten(1) @ weight).view_as(u) * t_eval[n]
            u = sde_step(u, [eps], coefs[n], seeds, n, True, gen)
        return u

    return loop, torch.randn(batch, K, dim, device=device, generator=gen)


def graph_replay(steps: int = 16, batch: int = 64, dim: int = 256) -> dict:
    """Capture :func:`fixed_grid_loop` on CUDA in a CUDA graph, replay it and compare with the
    eager loop (same seeds: the results must be equal)."""
    loop, u0 = fixed_grid_loop("cuda", steps, batch, dim)
    eager = loop(u0.clone())
    static_u = u0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(static_u.clone())  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_u)
    graph.replay()
    torch.cuda.synchronize()
    diff = (static_out - eager).abs().max().item()
    return {"status": "passed" if diff == 0 else "failed",
            "detail": f"{steps} steps, B={batch}, K={u0.shape[1]}, d={dim}: "
                      f"max |replay - eager| = {diff:g}"}


def check_cuda_graph(out: Path) -> dict:
    """:func:`graph_replay` in a subprocess (a failed capture cannot poison the other checks)."""
    code = ("import json; from fastmdm.gpu_check import graph_replay; "
            "print(json.dumps(graph_replay()))")
    status, tail = _run([sys.executable, "-c", code], timeout_s=60)
    if status == "passed":
        return json.loads(tail.splitlines()[-1])
    return {"status": status, "detail": tail}


CHECKS: dict[str, Callable[[Path], dict]] = {
    "kernel tests (CUDA vs torch path)": check_kernel_tests,
    "quick benchmark": check_quick_bench,
    "profiler trace": check_profile,
    "CUDA-graph replay of a sampler loop": check_cuda_graph,
}


def _environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "host": platform.node()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def run_checks(out: Path, checks: dict[str, Callable[[Path], dict]] | None = None) -> dict:
    """Run each check (a crash is recorded as a failure), timing it; the report as a dict."""
    rows = []
    for name, check in (checks or CHECKS).items():
        start = time.perf_counter()
        try:
            result = check(out)
        except Exception as e:
            result = {"status": "failed", "detail": f"{type(e).__name__}: {e}"}
        if result.get("status") not in STATUSES:
            raise ValueError(f"check {name!r} returned status {result.get('status')!r}, "
                             f"expected one of {STATUSES}")
        rows.append({"check": name, "status": result["status"],
                     "seconds": round(time.perf_counter() - start, 1),
                     "detail": str(result.get("detail", ""))})
    return {"date": datetime.date.today().isoformat(), "environment": _environment(),
            "ok": all(r["status"] != "failed" for r in rows), "checks": rows}


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """gpu-check-<date>.json and .md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-check-{report['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    env = ", ".join(f"{k} {v}" for k, v in report["environment"].items())
    lines = [f"# fastmdm gpu-check, {report['date']}", "", f"Environment: {env}.", "",
             f"Result: **{'all checks passed' if report['ok'] else 'FAILED'}**.", "",
             "| check | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['seconds']} |" for r in report["checks"]]
    for r in report["checks"]:
        lines += ["", f"## {r['check']}", "", "```", r["detail"], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(out="benchmarks/results", checks: dict[str, Callable[[Path], dict]] | None = None,
         cuda_available: Callable[[], bool] | None = None) -> int:
    """`fastmdm gpu-check`: 0 when every check passes, 1 when one fails, 2 without CUDA."""
    if not (cuda_available or torch.cuda.is_available)():
        print(NO_CUDA, file=sys.stderr)
        return 2
    report = run_checks(Path(out), checks)
    json_path, md_path = write_report(report, Path(out))
    for r in report["checks"]:
        print(f"{r['status']:>7}  {r['check']} ({r['seconds']} s)")
    print(f"wrote {json_path} and {md_path}")
    return 0 if report["ok"] else 1
