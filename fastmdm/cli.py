"""The ``fastmdm`` command line: train, sample, eval, bench, profile.

    fastmdm train --data digits --diffusion cld --steps 2000 --out runs/cld
    fastmdm sample --ckpt runs/cld --solver ei-ode --nfe 50 --out samples.png
    fastmdm eval --ckpt runs/cld --data digits
    fastmdm bench --preset quick --device cpu --out benchmarks/results
    fastmdm profile --what train --out profiles

``train`` resumes from ``OUT/checkpoint.pt`` when it exists, bit-identically, and refuses
changed training settings (only ``--steps`` and the evaluation/checkpoint/sampling options may
change); Ctrl-C checkpoints the step in progress and exits. It writes the loss curve
(``loss.png``), a sample grid (``samples.png``), ``history.json`` and, for learned
diffusions, the learned Q and D (``learned_QD.json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from .data import BUILTIN, load_dataset
from .evaluation import evaluate_bpd
from .solvers import get_solver
from .training import (
    DIFFUSIONS,
    MDM,
    OBJECTIVES,
    Trainer,
    build_mdm,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
)

Z_95 = 1.959964  # two-sided 95% normal quantile


# -- optional dependencies ----------------------------------------------------------------
EXTRAS = {"matplotlib": "plot", "sklearn": "data"}  # module -> the pip extra that installs it


def require(module: str, purpose: str) -> None:
    """Fail before any work, with one line naming the extra, when an optional dependency is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs {module}, which is not installed: "
                          f"pip install \"fastmdm[{EXTRAS[module]}]\"") from None


def _require_data(name: str) -> None:
    if name == "digits":
        require("sklearn", "--data digits")


# -- figures ------------------------------------------------------------------------------
def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install 'fastmdm[plot]'") from err
    return plt


def save_samples_figure(x: torch.Tensor, path: str, title: str | None = None) -> None:
    """Images (N, C, H, W) as a grid, or 2-D points (N, 2) as a scatter plot, saved as PNG."""
    plt = pyplot()
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.6)
        ax.set_aspect("equal")
    elif x.dim() == 4 and x.shape[1] in (1, 3):
        n = x.shape[0]
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        C, H, W = x.shape[1:]
        grid = torch.full((C, rows * (H + 1) + 1, cols * (W + 1) + 1), 0.5, dtype=x.dtype)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[:, 1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = x[i]
        fig, ax = plt.subplots(figsize=(cols * 0.5 + 0.5, rows * 0.5 + 0.5))
        image = grid[0] if C == 1 else grid.permute(1, 2, 0)
        ax.imshow(image.clamp(0, 1).numpy(), cmap="gray" if C == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    else:
        raise ValueError(f"can draw images (N, 1|3, H, W) or points (N, 2), got shape {tuple(x.shape)}")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_curve(history: dict, path: str, title: str | None = None) -> None:
    """Training loss (moving average over 50 steps) and, if present, evaluation BPD, saved as PNG."""
    plt = pyplot()
    loss = torch.tensor(history["loss"], dtype=torch.float64)
    window = max(1, min(50, loss.numel() // 5))
    smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, 1).flatten()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["loss"], alpha=0.25, lw=0.5, label="loss")
    ax.plot(history["step"][window - 1:], smooth.tolist(), lw=1.2, label=f"loss ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per sample")
    if history.get("eval_bpd"):
        ax2 = ax.twinx()
        ax2.plot(history["eval_step"], history["eval_bpd"], "o-", color="C3", ms=3, label="test BPD (EMA)")
        ax2.set_ylabel("bits per dim")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- commands -----------------------------------------------------------------------------
def _device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    return device


def _train_config(args, dataset) -> dict:
    network = args.network or ("unet" if len(dataset.data_shape) == 3 else "mlp")
    kwargs = {"base": args.width} if network == "unet" else {"hidden": args.width}
    return {"data": args.data, "diffusion": args.diffusion, "K": args.aux, "network": network,
            "network_kwargs": kwargs, "data_shape": dataset.data_shape, "levels": dataset.levels,
            "prediction": "eps", "objective": args.objective, "ema_decay": args.ema_decay, "seed": args.seed,
            "batch_size": args.batch_size}


def _check_resume(saved: dict, config: dict, path: str) -> None:
    """A run resumes only with the same data, diffusion, K, network and batch size (the Trainer
    checks its own hyperparameters: lr, warm-up, clipping, EMA decay, seed)."""
    for key in ("data", "diffusion", "K", "network", "network_kwargs", "objective", "batch_size"):
        if key in saved and saved[key] != config.get(key):
            raise ValueError(f"{path} was trained with {key}={saved.get(key)!r}, but this command asks for "
                             f"{key}={config.get(key)!r}; use another --out or the same settings")


def write_learned_matrices(mdm: MDM, path: str) -> dict:
    """Save the learned (EMA) Q and D as JSON and return them."""
    with mdm.ema_weights():
        matrices = {"K": mdm.diffusion.K, "Q": mdm.diffusion.Q.detach().cpu().tolist(),
                    "D": mdm.diffusion.D.detach().cpu().tolist()}
    with open(path, "w") as f:
        json.dump(matrices, f, indent=2)
    return matrices


def _check_writable(path: str, option: str, directory: bool = False) -> None:
    """Fail before any work, naming the option, when ``path`` cannot be written (folders are created)."""
    folder = path if directory else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {path!r} cannot be written: {err.strerror}") from err
    if not os.access(folder, os.W_OK) or (not directory and os.path.isdir(path)):
        raise ValueError(f"{option} {path!r} cannot be written: not a writable "
                         f"{'directory' if directory else 'file'}")


def cmd_train(args) -> int:
    torch.manual_seed(args.seed)
    device = _device(args.device)
    require("matplotlib", "train (loss.png, samples.png)")
    _require_data(args.data)
    _check_writable(args.out, "--out", directory=True)
    dataset = load_dataset(args.data, seed=args.seed)
    config = _train_config(args, dataset)
    path = checkpoint_path(args.out)
    saved = read_checkpoint(path) if os.path.exists(path) else None
    if saved is not None:
        _check_resume(saved["config"], config, path)
    mdm = build_mdm(config).to(device)
    trainer = Trainer(mdm, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip, seed=args.seed,
                      config=config)
    if saved is not None:
        trainer.load_state_dict(saved)
        print(f"resuming {path} from step {trainer.step_count}", file=sys.stderr)
    eval_data = dataset.test[: args.eval_size].to(device)
    with tqdm(total=args.steps, initial=trainer.step_count, desc="train", unit="step") as bar:

        def report(tr: Trainer, loss: float) -> None:
            shown = {"loss": f"{loss:.4g}"}
            if tr.history["eval_bpd"]:
                shown["bpd"] = f"{tr.history['eval_bpd'][-1]:.3f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(tr.step_count - bar.n)

        trainer.fit(dataset.train.to(device), args.steps, args.batch_size, out_dir=args.out,
                    checkpoint_every=args.checkpoint_every, eval_data=eval_data, eval_every=args.eval_every,
                    callback=report)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(trainer.history, f)
    if trainer.history["loss"]:
        title = f"{args.diffusion} on {args.data}"
        save_loss_curve(trainer.history, os.path.join(args.out, "loss.png"), title)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = mdm.sample(args.samples, steps=args.sample_steps, generator=generator)
    save_samples_figure(samples, os.path.join(args.out, "samples.png"), f"{args.diffusion} (EMA)")
    if mdm.diffusion.learned:
        matrices = write_learned_matrices(mdm, os.path.join(args.out, "learned_QD.json"))
        print(f"learned Q = {matrices['Q']}\nlearned D = {matrices['D']}")
    print(f"wrote {args.out}/checkpoint.pt, loss.png, samples.png, history.json")
    return 0


def _sampling_steps(solver: str | None, nfe: int) -> int:
    """Steps that spend at most ``nfe`` network evaluations (rk45 is adaptive: nfe sets its output grid)."""
    return max(1, nfe // (get_solver(solver).nfe_per_step if solver else 1))  # the defaults: 1 per step


def cmd_sample(args) -> int:
    device = _device(args.device)
    require("matplotlib", "sample (the --out figure)")
    mdm, _ = load_checkpoint(args.ckpt, map_location=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps = _sampling_steps(args.solver, args.nfe)
    samples = mdm.sample(args.n, steps=steps, solver=args.solver, generator=generator)
    save_samples_figure(samples, args.out, f"{mdm.diffusion.name}, {args.solver or 'default'}, {steps} steps")
    if args.npy:
        import numpy as np

        np.save(args.npy, samples.cpu().numpy())
    print(f"wrote {args.out}" + (f" and {args.npy}" if args.npy else ""))
    return 0


EVAL_ODE_N = 32  # default ODE subset
EVAL_RTOL, FULL_RTOL = 1e-3, 1e-5  # default and --full ODE tolerance


def _eval_settings(args, n_all: int, device: torch.device) -> dict:
    """(examples, batch size, options) per method: the quick defaults, or --full, or what was asked.

    The ODE's divergence probes go through a VJP on a CPU (one backward pass: about 30× faster than
    the forward-mode JVP for a small U-Net there), through a JVP elsewhere."""
    ode_n = args.ode_n if args.ode_n is not None else (0 if args.full else EVAL_ODE_N)
    rtol = args.rtol if args.rtol is not None else (FULL_RTOL if args.full else EVAL_RTOL)
    mode = args.divergence_mode or ("vjp" if device.type == "cpu" else "jvp")
    ode_options = {"rtol": rtol, "atol": rtol, "mode": mode}
    return {"elbo": (n_all, args.batch_size, {"repeats": args.repeats}),
            "ode": (min(ode_n or n_all, n_all), args.ode_batch_size, ode_options)}


def _describe(options: dict) -> str:
    return "".join(f", {key} {value:g}" if isinstance(value, (int, float)) else f", {key} {value}"
                   for key, value in options.items() if key != "atol")


def cmd_eval(args) -> int:
    device = _device(args.device)
    if args.json:
        _check_writable(args.json, "--json")
    mdm, state = load_checkpoint(args.ckpt, map_location=device)
    data_name = args.data or state["config"].get("data")
    if data_name is None:
        raise ValueError(f"the checkpoint {args.ckpt!r} does not name its data set; pass --data")
    _require_data(data_name)
    dataset = load_dataset(data_name, seed=state["config"].get("seed", 0))
    if dataset.data_shape != mdm.data_shape:
        raise ValueError(f"--data {data_name!r} has samples of shape {dataset.data_shape} but the "
                         f"checkpoint's model expects {mdm.data_shape}")
    if dataset.levels != mdm.transform.levels:
        raise ValueError(f"--data {data_name!r} has levels={dataset.levels} but the checkpoint's model was "
                         f"trained on levels={mdm.transform.levels}")
    split = dataset.test if args.split == "test" else dataset.train
    x = split[: args.n].to(device)
    settings = _eval_settings(args, x.shape[0], device)
    results = {"checkpoint": args.ckpt, "data": data_name, "split": args.split, "n": x.shape[0],
               "step": state.get("step"), "full": args.full}
    methods = ("elbo", "ode") if args.method == "both" else (args.method,)
    for method in methods:
        n, batch_size, kwargs = settings[method]
        t0 = time.perf_counter()
        mean, se, _ = evaluate_bpd(mdm, x[:n], method, batch_size, seed=args.seed, progress=True, **kwargs)
        if not math.isfinite(mean):
            raise FloatingPointError(f"{method} bits per dim is {mean}: the model returns non-finite values "
                                     f"on this data")
        seconds = time.perf_counter() - t0
        results[method] = {"bpd": mean, "stderr": se, "ci95": [mean - Z_95 * se, mean + Z_95 * se],
                           "n": n, "seconds": seconds, **kwargs}
        print(f"{method.upper():4s} BPD {mean:.4f} ± {Z_95 * se:.4f} (95% CI, n={n} of {len(split)} "
              f"{args.split} examples{_describe(kwargs)}, {seconds:.1f} s)")
        if n < len(split) and not args.full:
            print(f"     {method.upper()} on a subset: for all {len(split)} examples and the published "
                  f"settings add --full (at least {seconds * len(split) / n / 60:.1f} min at this rate)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
    return 0


def cmd_bench(args) -> int:
    from .benchmarking import run_bench

    run_bench(args.preset, args.device, args.out)
    return 0


def cmd_profile(args) -> int:
    from .cli_profile import run_profile

    run_profile(args.what, args.out, args.device)
    return 0


def cmd_gpu_check(args) -> int:
    from .gpu_check import main as gpu_check

    return gpu_check(args.out)


# -- parser -------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help text then says what the default is)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="fastmdm", description="Train, sample and evaluate multivariate "
                                     "diffusion models.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an MDM (resumes from OUT/checkpoint.pt)", formatter_class=fmt,
                           description="Train an MDM. If OUT/checkpoint.pt exists the run resumes from it, "
                           "bit-identically to an uninterrupted run: only --steps and the evaluation, "
                           "checkpoint and sampling options may change; any other changed "
                           "setting (--lr, --warmup, --ema-decay, --batch-size, --seed, ...) is refused "
                           "with an error naming it. Ctrl-C finishes the current step, checkpoints it "
                           "and exits; a second Ctrl-C exits at once, keeping the last checkpoint.")
    train.add_argument("--data", default="digits",
                       help=f"one of {', '.join(BUILTIN)}, or a path to a .npy/.npz/IDX file")
    train.add_argument("--diffusion", choices=DIFFUSIONS, default="vpsde")
    train.add_argument("--aux", type=_positive_int, default=None,
                       help="K, the number of variables (data + auxiliaries) for malda/learned (default 3)")
    train.add_argument("--steps", type=_nonneg_int, default=2000, help="total optimisation steps")
    train.add_argument("--out", required=True, help="run directory (checkpoint, figures, history)")
    train.add_argument("--network", choices=("mlp", "unet"), default=None,
                       help="score network (default: unet for images, mlp otherwise)")
    train.add_argument("--width", type=_positive_int, default=32,
                       help="U-Net base channels or MLP hidden width")
    train.add_argument("--objective", choices=OBJECTIVES, default="dsm")
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup", type=_positive_int, default=100, help="learning-rate warm-up steps")
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    train.add_argument("--ema-decay", type=float, default=0.999)
    train.add_argument("--checkpoint-every", type=_positive_int, default=250)
    train.add_argument("--eval-every", type=_positive_int, default=250, help="test-BPD evaluation period")
    train.add_argument("--eval-size", type=_positive_int, default=256, help="test samples per evaluation")
    train.add_argument("--samples", type=_positive_int, default=64, help="size of the final sample grid")
    train.add_argument("--sample-steps", type=_positive_int, default=50)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="draw samples from a checkpoint", formatter_class=fmt)
    sample.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    sample.add_argument("--solver", default=None, help="sampler (see fastmdm.SOLVERS); library default")
    sample.add_argument("--nfe", type=_positive_int, default=50, help="network evaluations")
    sample.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    sample.add_argument("--out", default="samples.png", help="PNG grid (images) or scatter plot (2-D)")
    sample.add_argument("--npy", default=None, help="also save the samples as a .npy array")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None)
    sample.set_defaults(func=cmd_sample)

    evaluate = sub.add_parser("eval", help="test bits per dim (ELBO and ODE) with confidence intervals",
                              formatter_class=fmt,
                              description="Bits per dim with 95% confidence intervals and a progress bar "
                              "with the estimated time left. The defaults finish in minutes on a CPU: the "
                              f"ELBO on every example, the ODE likelihood on the first {EVAL_ODE_N} "
                              f"(a random subset: the split is shuffled) at rtol {EVAL_RTOL:g}. --full "
                              f"evaluates the ODE on every example at rtol {FULL_RTOL:g} (slow on a CPU).")
    evaluate.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    evaluate.add_argument("--data", default=None, help="data set (default: the one the model was trained on)")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--method", choices=("elbo", "ode", "both"), default="both")
    evaluate.add_argument("--n", type=_positive_int, default=None, help="at most this many examples "
                          "(default: the whole split)")
    evaluate.add_argument("--ode-n", type=_nonneg_int, default=None, help="ODE on the first this many of "
                          f"them, 0 = all (default: {EVAL_ODE_N}; with --full, all)")
    evaluate.add_argument("--repeats", type=_positive_int, default=4, help="ELBO draws per sample")
    evaluate.add_argument("--rtol", type=float, default=None, help="ODE solver rtol (= atol) (default: "
                          f"{EVAL_RTOL:g}; with --full, {FULL_RTOL:g})")
    evaluate.add_argument("--full", action="store_true", help="the full evaluation: the ODE on every "
                          f"example at rtol {FULL_RTOL:g}")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, help="ELBO batch size")
    evaluate.add_argument("--ode-batch-size", type=_positive_int, default=16, help="ODE batch size")
    evaluate.add_argument("--divergence-mode", choices=("jvp", "vjp"), default=None,
                          help="how the ODE's Hutchinson probes differentiate the network (default: vjp "
                          "on a CPU, where it is much faster, jvp on a GPU)")
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="run the benchmark suite (fastmdm vs reference)",
                           formatter_class=fmt)
    bench.add_argument("--preset", choices=("quick", "full"), default="quick")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None)
    bench.add_argument("--out", default="benchmarks/results", help="directory for the JSON/Markdown report")
    bench.set_defaults(func=cmd_bench)

    profile = sub.add_parser("profile", help="profile a workload with torch.profiler", formatter_class=fmt)
    profile.add_argument("--what", choices=("train", "sample", "elbo"), default="train")
    profile.add_argument("--out", default="profiles", help="directory for the trace")
    profile.add_argument("--device", choices=("cpu", "cuda"), default=None)
    profile.set_defaults(func=cmd_profile)

    gpu = sub.add_parser("gpu-check", help="kernel tests on CUDA, quick benchmark, profiler trace and a "
                         "CUDA-graph replay, in one report (exit 2 without CUDA)", formatter_class=fmt)
    gpu.add_argument("--out", default="benchmarks/results", help="directory for gpu-check-<date>.md/.json")
    gpu.set_defaults(func=cmd_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastmdm`` command; errors in the input exit with status 2 and one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError) as err:
        parser.exit(2, f"fastmdm {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept and the run resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "save_loss_curve", "save_samples_figure"]
