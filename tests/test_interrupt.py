"""Ctrl-C at random moments: `fastmdm train` interrupted by SIGINT, resumed, equals the straight run bit for bit.

The straight run and the final resume run in this process (``main``); the interrupted runs are
subprocesses that receive a real SIGINT a seeded random delay after their progress bar appears.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastmdm.cli import main
from fastmdm.training import read_checkpoint

STEPS = 60
TOY = ["--data", "moons", "--diffusion", "cld", "--width", "8", "--batch-size", "16", "--steps", str(STEPS),
       "--eval-every", "7", "--eval-size", "64", "--checkpoint-every", "10", "--samples", "4",
       "--sample-steps", "2", "--device", "cpu", "--seed", "3"]
INTERRUPTIONS = 3


def _interrupted_run(out: str, delay: float, log: Path) -> int:
    """Start `fastmdm train`, wait for its progress bar, then ``delay`` seconds, then send SIGINT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fastmdm.cli", "train", "--out", out, *TOY],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while "train:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=120)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS and a["history"] == b["history"]
    for key in ("model", "scheduler", "hyperparameters", "config"):
        assert a[key].keys() == b[key].keys(), key
        for name, value in a[key].items():
            same = torch.equal(value, b[key][name]) if isinstance(value, torch.Tensor) else value == b[key][name]
            assert same, (key, name)
    for key in ("batch_generator", "noise_generator"):
        assert torch.equal(a[key], b[key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def test_sigint_at_random_moments_resumes_bit_identically(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert main(["train", "--out", straight, *TOY]) == 0
    rng = random.Random(20261201)
    steps_saved = []
    for i in range(INTERRUPTIONS):
        log = tmp_path / f"stderr{i}.txt"
        code = _interrupted_run(resumed, rng.uniform(0.0, 0.4), log)
        err = log.read_text()
        assert code in (0, 130, -signal.SIGINT), err[-2000:]
        if code == 130:
            assert "interrupted; the last checkpoint is kept" in err
        if os.path.exists(os.path.join(resumed, "checkpoint.pt")):
            steps_saved.append(read_checkpoint(resumed)["step"])
    assert steps_saved and min(steps_saved) < STEPS, steps_saved  # a run was cut short inside the loop
    assert main(["train", "--out", resumed, *TOY]) == 0
    _assert_identical(read_checkpoint(straight), read_checkpoint(resumed))
    assert open(os.path.join(straight, "history.json")).read() == open(os.path.join(resumed, "history.json")).read()
