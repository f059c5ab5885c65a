"""simclr.py end to end: 2-rank torchrun smoke run, bit-exact resume, SIGKILL at random moments, clear errors."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import ROOT, _env, assert_same_tensors, launch, load_ckpt, read_log, tiny_args


def test_smoke_two_ranks_and_export(image_folder, tmp_path):
    out = str(tmp_path / "run")
    launch("simclr.py", tiny_args(image_folder, out))
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and "knn_top1" in rows[-1]
    blob = load_ckpt(out)
    assert blob["epoch"] == 2 and blob["step"] == 4 and blob["config"]["batch_size"] == 8
    assert os.path.exists(os.path.join(out, "config.yaml"))
    # The exported backbone loads into torchvision's resnet18 (CIFAR stem) without renaming.
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = tv.load_state_dict(torch.load(os.path.join(out, "backbone.pt"), weights_only=True),
                                             strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    # ... and the evaluation scripts read the checkpoint.
    knn = launch("eval/knn.py", ["--checkpoint", os.path.join(out, "last.pt"), "--num_workers", "0", "--k", "5"],
                 nproc=0)
    assert "5-NN top-1" in knn.stdout


def test_resume_is_bit_exact(image_folder, tmp_path):
    """2 epochs straight vs. the epoch-1 checkpoint of that run relaunched: identical weights and optimizer."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    launch("simclr.py", tiny_args(image_folder, straight, "--save_every", "1", "--eval_every", "0"))
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))
    run = launch("simclr.py", tiny_args(image_folder, resumed, "--eval_every", "0"))
    assert "resumed from" in run.stdout and "at epoch 1" in run.stdout
    a, b = load_ckpt(straight), load_ckpt(resumed)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])
    assert read_log(resumed)[0]["epoch"] == 1


def test_sigkill_at_random_moments_then_relaunch(image_folder, tmp_path):
    """Kill -9 the same command at random times until it finishes; it must end with the uninterrupted weights."""
    args = tiny_args(image_folder, "OUT", "--arch", "vit_debug", "--patch_size", "8", "--epochs", "4",
                     "--max_steps_per_epoch", "4", "--eval_every", "2")
    def cmd(out):
        return [sys.executable, os.path.join(ROOT, "simclr.py")] + [out if a == "OUT" else a for a in args]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    start = time.perf_counter()
    subprocess.run(cmd(straight), cwd=ROOT, env=_env(), check=True, capture_output=True)
    duration = time.perf_counter() - start  # kill times are drawn relative to an uninterrupted run
    rng, kills = random.Random(0), 0
    while True:
        proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.3, 0.95) * duration if kills < 4 else 300)
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 1
    a, b = load_ckpt(straight), load_ckpt(killed)
    assert a["epoch"] == b["epoch"] == 4
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])


@pytest.mark.parametrize("extra, message", [
    (["--arch", "resnet19"], "arch='resnet19' is not one of"),
    (["--dataset", "cifar11"], "dataset='cifar11' is not one of"),
    (["--dataset", "imagefolder", "--data_dir", "/nonexistent"], "no image folder at /nonexistent/train"),
    (["--dataset", "cifar10", "--download", "false", "--data_dir", "/nonexistent"], "cifar10 not found"),
    (["--batch_size", "-8"], "batch_size must be positive"),
    (["--config", "BADYAML"], "unknown key 'learning_rate'"),
    (["--resume", "CORRUPT"], "is unreadable"),
])
def test_bad_input_is_one_clear_line(process_group, image_folder, tmp_path, monkeypatch, capsys, extra, message):
    """In-process (fast): config.run(main) turns the error into one stderr line and exit status 2."""
    import simclr
    from common import config
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    extra = [str(tmp_path / "bad.yaml") if a == "BADYAML" else str(tmp_path / "corrupt.pt") if a == "CORRUPT" else a
             for a in extra]
    monkeypatch.setattr(sys, "argv", ["simclr.py"] + tiny_args(image_folder, str(tmp_path / "out"), *extra))
    with pytest.raises(SystemExit) as exit_:
        config.run(simclr.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_input_from_the_command_line(tmp_path):
    """The same end to end: a corrupt last.pt in output_dir is refused with one line, and left in place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00" * 100)
    run = launch("simclr.py", ["--dataset", "fake", "--output_dir", str(out), "--device", "cpu"], nproc=0, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert "last.pt is unreadable" in run.stderr and (out / "last.pt").read_bytes() == b"\x00" * 100


def test_batch_must_divide_across_ranks(image_folder, tmp_path):
    out = launch("simclr.py", tiny_args(image_folder, str(tmp_path / "o"), "--batch_size", "7"), check=False)
    assert out.returncode != 0 and "does not divide across 2 ranks" in out.stderr


def test_resume_refuses_a_checkpoint_of_another_shape(image_folder, tmp_path):
    out = str(tmp_path / "run")
    launch("simclr.py", tiny_args(image_folder, out, "--epochs", "1", "--eval_every", "0"), nproc=0)
    before = load_ckpt(out)
    bad = launch("simclr.py", tiny_args(image_folder, out, "--proj_dim", "16"), nproc=0, check=False)
    assert bad.returncode == 2 and "does not fit this run" in bad.stderr and "proj_dim: 32 -> 16" in bad.stderr
    assert_same_tensors(before["model"], load_ckpt(out)["model"])  # never overwritten


def test_import_has_no_side_effects_and_help_works():
    out = subprocess.run([sys.executable, "-c", "import simclr, sys; print(len(sys.argv))"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1"
    help_ = launch("simclr.py", ["--help"], nproc=0)
    assert "--temperature" in help_.stdout and "--max_steps_per_epoch" in help_.stdout
