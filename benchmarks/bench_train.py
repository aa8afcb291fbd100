"""Training-step benchmark on CPU: digits (1×8×8), the U-Net, batch 128.

    python benchmarks/bench_train.py [--batch 128] [--width 32] [--repeats 15] [--threads 2]

For each diffusion and objective it times, interleaved and with the same network,
optimiser and data:

* ``fastmdm``   — one Trainer-style step of fastmdm.MDM (loss, backward, Adam step);
* ``network``   — the same network calls on fixed, precomputed inputs with a plain
                  squared loss (forward, backward, Adam step): the floor for any library;
* ``reference`` — the noise-prediction step through fastmdm.reference (objective "noise" only:
                  the reference has no ELBO with t-importance sampling and t_min offset).

overhead = (fastmdm − network) / fastmdm is the share of the step spent outside the network;
speed-up = reference / fastmdm. Medians of ``repeats`` rounds; targets:
overhead ≤ 10 %, speed-up ≥ 1.3×. Writes a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from fastmdm import benchmarking as bm
from fastmdm import reference
from fastmdm.data import DataTransform, load_digits
from fastmdm.models import UNetScore
from fastmdm.training import MDM, make_diffusion


def _step(optimizer, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()


def _fresh(width: int, K: int, seed: int = 0):
    torch.manual_seed(seed)
    net = UNetScore((1, 8, 8), K, base=width)
    return net, torch.optim.Adam(net.parameters(), lr=1e-4)


def _workloads(kind: str, K: int | None, objective: str, x: torch.Tensor, width: int) -> dict:
    diffusion = make_diffusion(kind, K)
    K = diffusion.K
    transform = DataTransform(17)
    net, opt = _fresh(width, K)
    mdm = MDM(diffusion, net, objective=objective, data_transform=transform)
    gen = torch.Generator().manual_seed(0)
    y, _ = transform.forward(x, gen)
    # the network calls the fastmdm objective makes: one per step ("noise"), two ("dsm": integrand + offset)
    calls = 1 if objective == "noise" else 2
    with torch.no_grad():
        inputs = [diffusion.perturb(y, torch.rand(x.shape[0]) * 0.99 + 0.01, generator=gen) for _ in range(calls)]
    times = [torch.rand(x.shape[0]) * 0.99 + 0.01 for _ in range(calls)]
    net_only, opt_only = _fresh(width, K)

    def network_loss():
        return sum(((net_only(u, t) - e) ** 2).flatten(1).sum(1).mean() for (u, e), t in
                   zip(inputs, times, strict=True))

    work = {"fastmdm": lambda: _step(opt, lambda: mdm.loss(x, gen).mean()),
            "network": lambda: _step(opt_only, network_loss)}
    if objective == "noise":
        ref_net, ref_opt = _fresh(width, K)
        Q, D = diffusion.Q.detach().float(), diffusion.D.detach().float()  # the reference learns no Q, D
        var = diffusion.stationary_var.float()

        def reference_loss():
            return reference.noise_prediction_loss(ref_net, Q, D, y, generator=gen, stationary_var=var).mean()

        work["reference"] = lambda: _step(ref_opt, reference_loss)
    return work


def _time(work: dict, repeats: int) -> dict:
    """Median seconds per step of each workload: the suite's timer, one step per sample, interleaved."""
    timings = bm.measure_interleaved(work, "cpu", budget_s=0.0, min_samples=repeats, min_sample_s=0.0)
    for timing in timings.values():
        if isinstance(timing, Exception):
            raise timing
    return {name: timing.median_s for name, timing in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32, help="U-Net base channels")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/bench-train-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = load_digits().train[: args.batch]
    rows = []
    for kind, K in [("vpsde", None), ("cld", None), ("malda", 3), ("learned", 3)]:
        for objective in ("noise", "dsm"):
            t = _time(_workloads(kind, K, objective, x, args.width), args.repeats)
            overhead = (t["fastmdm"] - t["network"]) / t["fastmdm"]
            speedup = t["reference"] / t["fastmdm"] if "reference" in t else None
            rows.append((kind if K is None else f"{kind}({K})", objective, t, overhead, speedup))
            ref = f"{1e3 * t['reference']:.1f}" if speedup else "–"
            print(f"{rows[-1][0]:10s} {objective:5s} fastmdm {1e3 * t['fastmdm']:.1f} ms  network "
                  f"{1e3 * t['network']:.1f} ms  reference {ref} ms  overhead {100 * overhead:.1f}%"
                  + (f"  speed-up {speedup:.2f}x" if speedup else ""), flush=True)
    lines = [
        "# Training step on CPU: digits, U-Net, batch " + str(args.batch),
        "",
        f"`python benchmarks/bench_train.py --batch {args.batch} --width {args.width} --repeats {args.repeats} "
        f"--threads {args.threads}` — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {time.strftime('%Y-%m-%d')}. Medians of {args.repeats} interleaved rounds "
        "(ms per optimisation step, Adam). The machine was shared with other jobs, so absolute times are noisy; "
        "the ratios come from rounds measured side by side.",
        "",
        "| diffusion | objective | fastmdm (ms) | network only (ms) | reference (ms) | overhead outside network | "
        "speed-up vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, objective, t, overhead, speedup in rows:
        ref = f"{1e3 * t['reference']:.1f}" if speedup else "–"
        lines.append(f"| {name} | {objective} | {1e3 * t['fastmdm']:.1f} | {1e3 * t['network']:.1f} | {ref} | "
                     f"{100 * overhead:.1f}% | {f'{speedup:.2f}×' if speedup else '–'} |")
    lines += ["", "Targets: overhead ≤ 10 % of the step; ≥ 1.3× faster per step than the reference. "
              "`network only` makes the same number of network calls as the fastmdm objective (1 for noise, 2 for "
              "the DSM ELBO: integrand and t_min offset) on precomputed inputs; the reference has no ELBO "
              "objective, so it is compared on noise prediction only.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
