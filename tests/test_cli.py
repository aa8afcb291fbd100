"""CLI smoke tests: train 20 steps on digits with a tiny U-Net → resume → sample → eval; --help; bad input."""

import json

import pytest
import torch

from fastmdm.cli import build_parser, main

TINY = ["--data", "digits", "--width", "8", "--batch-size", "32", "--eval-every", "10", "--eval-size", "32",
        "--checkpoint-every", "10", "--samples", "4", "--sample-steps", "5"]
TOY = ["--data", "moons", "--diffusion", "cld", "--width", "8", "--batch-size", "16", "--eval-every", "1",
       "--eval-size", "8", "--samples", "4", "--sample-steps", "2", "--device", "cpu"]


def test_train_resume_sample_eval(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--diffusion", "learned", "--aux", "2", "--steps", "20", "--out", run, *TINY]) == 0
    for name in ("checkpoint.pt", "loss.png", "samples.png", "history.json", "learned_QD.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["step"] == list(range(1, 21)) and len(history["eval_bpd"]) == 2
    learned = json.loads((tmp_path / "run" / "learned_QD.json").read_text())
    assert learned["K"] == 2 and len(learned["Q"]) == 2

    # resuming continues from step 20 and keeps the completed steps
    assert main(["train", "--diffusion", "learned", "--aux", "2", "--steps", "25", "--out", run, *TINY]) == 0
    assert "resuming" in capsys.readouterr().err
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["step"] == list(range(1, 26))

    png = str(tmp_path / "s.png")
    assert main(["sample", "--ckpt", run, "--solver", "ei-ode", "--nfe", "5", "--n", "4", "--out", png]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--ckpt", run, "--n", "8", "--repeats", "1", "--rtol", "1e-2", "--json", out]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    for method in ("elbo", "ode"):
        assert result[method]["ci95"][0] < result[method]["bpd"] < result[method]["ci95"][1]
        assert 0 < result[method]["bpd"] < 20
    assert "ELBO BPD" in capsys.readouterr().out


def test_bad_input_exits_with_one_clear_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--diffusion", "cld", "--steps", "2", "--out", run, *TINY]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a checkpoint from another diffusion
        main(["train", "--diffusion", "vpsde", "--steps", "4", "--out", run, *TINY])
    assert exit_info.value.code == 2
    assert "trained with diffusion='cld'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # K mismatch
        main(["train", "--diffusion", "cld", "--aux", "3", "--out", str(tmp_path / "b"), *TINY])
    assert "K=3 does not match diffusion 'cld'" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit):  # unreadable file
        main(["sample", "--ckpt", str(tmp_path / "junk.pt")])
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # data of another shape than the model's
        main(["eval", "--ckpt", run, "--data", "moons"])
    assert "expects (1, 8, 8)" in capsys.readouterr().err


def _fails_with(argv, capsys, *fragments):
    """main(argv) exits non-zero with one line on stderr that contains every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_resume_refuses_changed_settings_and_broken_outputs_fail_cleanly(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, *TOY, "--steps", "2"]) == 0
    for flag, value in [("--lr", "2e-3"), ("--warmup", "7"), ("--ema-decay", "0.99"), ("--batch-size", "8"),
                        ("--grad-clip", "0.5"), ("--seed", "1")]:
        name = flag[2:].replace("-", "_")
        _fails_with(["train", "--out", run, *TOY, "--steps", "4", flag, value], capsys, f"{name}=", "trained with")
    assert torch.load(f"{run}/checkpoint.pt", weights_only=True)["step"] == 2
    (tmp_path / "file.txt").write_text("not a directory")
    _fails_with(["train", "--out", str(tmp_path / "file.txt" / "run"), *TOY, "--steps", "1"], capsys,
                "--out", "cannot be written")
    _fails_with(["eval", "--ckpt", run, "--json", str(tmp_path / "file.txt" / "e.json")], capsys,
                "--json", "cannot be written")

    state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
    state["model"]["score_model.out.weight"][0, 0] = float("nan")
    torch.save(state, str(tmp_path / "nan.pt"))
    for command in (["eval", "--n", "8", "--json", str(tmp_path / "e.json")], ["sample", "--n", "2"]):
        _fails_with([*command, "--ckpt", str(tmp_path / "nan.pt")], capsys, "NaN or infinite weights")
    assert not (tmp_path / "e.json").exists()
    state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
    del state["config"]["network"]
    torch.save(state, str(tmp_path / "no_network.pt"))
    _fails_with(["sample", "--ckpt", str(tmp_path / "no_network.pt")], capsys, "config lacks the entries ['network']")


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["eval"], ["bench"], ["profile"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastmdm" in capsys.readouterr().out
