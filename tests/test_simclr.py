"""simclr.py: the loss against a loop transcription of Eq. 1 and analytic cases; one 2-rank torchrun run (smoke,
log, export, k-NN on its checkpoint) resumed bit-exactly on the gloo pool; SIGKILL at random moments (slow); clear
errors; no side effects at import."""
import contextlib
import io
import math
import os
import random
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from helpers import (ROOT, assert_same_tensors, copy_epoch_1, env, launch, load_ckpt, read_log, run_script,
                     tiny_args)
from simclr import simclr_loss


# ----- the loss -----

def naive_nt_xent(z1, z2, tau):
    """SimCLR Eq. 1 written out: for each of the 2N anchors, -log(exp(s_pos/tau) / sum_{k != i} exp(s_ik/tau))."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / tau for k in range(2 * n)]
        denom = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        total = total - torch.log(torch.exp(sims[pos]) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("n, tau", [(1, 0.5), (5, 0.1), (8, 1.0)])
def test_simclr_loss_matches_reference(process_group, n, tau):
    torch.manual_seed(n)
    z1 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    ours, ref = simclr_loss(z1, z2, tau), naive_nt_xent(z1, z2, tau)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [z1, z2]), torch.autograd.grad(ref, [z1, z2])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_simclr_loss_analytic_cases(process_group):
    # Identical views, mutually orthogonal images: positive similarity 1, negatives 0 (and one more positive copy).
    z = torch.eye(4)
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 6 * math.exp(0)))
    assert simclr_loss(z, z, tau).item() == pytest.approx(expected, rel=1e-6)
    # Scale invariance (inputs are normalised inside) and symmetry in the two views.
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(simclr_loss(a, b, 0.2), simclr_loss(3 * a, b, 0.2))
    torch.testing.assert_close(simclr_loss(a, b, 0.2), simclr_loss(b, a, 0.2))


# ----- one 2-rank torchrun run: smoke, log, export, evaluation, resume -----

@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """2 ranks, 2 epochs of the tiny preset (resnet8), k-NN every epoch, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("simclr") / "straight")
    launch("simclr.py", tiny_args(image_folder, out, "--save_every", "1"), torchrun=True)  # the README's torchrun
    return out


@pytest.mark.e2e
def test_smoke_two_ranks_log_and_export(run, keep_group, capsys):
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and "knn_top1" in rows[-1]
    blob = load_ckpt(run)
    assert blob["epoch"] == 2 and blob["step"] == 4 and blob["config"]["batch_size"] == 8
    assert os.path.exists(os.path.join(run, "config.yaml"))
    # backbone.pt is the trained backbone, bare (its torchvision load: tests/common/test_checkpoint.py, ResNet-18)
    exported = torch.load(os.path.join(run, "backbone.pt"), weights_only=True)
    assert_same_tensors(exported, {k[9:]: v for k, v in blob["model"].items() if k.startswith("backbone.")})
    # ... and the evaluation tools read the checkpoint.
    from eval import knn
    knn.main(["--checkpoint", os.path.join(run, "last.pt"), "--num_workers", "0", "--k", "5"])
    assert "5-NN top-1" in capsys.readouterr().out


@pytest.mark.e2e
def test_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """2 epochs straight (torchrun) vs. the epoch-1 checkpoint of that run resumed on 2 ranks (the gloo pool, without
    k-NN): identical weights and optimizer."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "simclr", tiny_args(image_folder, resumed, "--save_every", "1", "--eval_every",
                                                         "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])
    assert read_log(resumed)[0]["epoch"] == 1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_relaunch(image_folder, tmp_path):
    """Kill -9 the same command at random times until it finishes; it must end with the uninterrupted weights.
    (slow: 5 or more interpreters; in the default run test_resume_is_bit_exact resumes from a checkpoint and
    tests/common/test_checkpoint.py checks that a write cut short leaves the previous last.pt loadable)"""
    args = tiny_args(image_folder, "OUT", "--arch", "vit_debug", "--patch_size", "8", "--epochs", "4",
                     "--max_steps_per_epoch", "4", "--eval_every", "2")
    def cmd(out):
        return [sys.executable, os.path.join(ROOT, "simclr.py")] + [out if a == "OUT" else a for a in args]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    start = time.perf_counter()
    subprocess.run(cmd(straight), cwd=ROOT, env=env(), check=True, capture_output=True)
    duration = time.perf_counter() - start  # kill times are drawn relative to an uninterrupted run
    rng, kills = random.Random(0), 0
    while True:
        proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


# ----- clear errors, in this process (the 2-rank one on the pool) -----

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


def test_bad_input_from_the_command_line(process_group, keep_group, tmp_path, monkeypatch, capsys):
    """The same through the script's `__main__` block (run as `python simclr.py` runs it): a corrupt last.pt in
    output_dir is refused with one line and exit status 2, and left in place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00" * 100)
    monkeypatch.setattr(sys, "argv", ["simclr.py", "--dataset", "fake", "--output_dir", str(out), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "simclr.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "last.pt is unreadable" in err and (out / "last.pt").read_bytes() == b"\x00" * 100


def _batch_of_7(data_dir, out):
    """On each pool rank: simclr.py with a global batch of 7; returns (exit status, stderr)."""
    import simclr
    from common import config
    err, argv = io.StringIO(), sys.argv
    sys.argv = ["simclr.py"] + tiny_args(data_dir, out, "--batch_size", "7")
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            config.run(simclr.main)
    finally:
        sys.argv = argv
    return exit_.value.code, err.getvalue()


def test_batch_must_divide_across_ranks(image_folder, gloo_pool, tmp_path):
    for code, err in gloo_pool.run(_batch_of_7, image_folder, str(tmp_path / "o")):
        assert code != 0 and "does not divide across 2 ranks" in err


def test_resume_refuses_a_checkpoint_of_another_shape(process_group, image_folder, tmp_path, monkeypatch, capsys):
    import simclr
    from common import config
    out = str(tmp_path / "run")
    run_script("simclr", tiny_args(image_folder, out, "--epochs", "1", "--eval_every", "0"))
    before = load_ckpt(out)
    monkeypatch.setattr(sys, "argv", ["simclr.py"] + tiny_args(image_folder, out, "--proj_dim", "16"))
    with pytest.raises(SystemExit) as exit_:
        config.run(simclr.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "does not fit this run" in err and "proj_dim: 32 -> 16" in err
    assert_same_tensors(before["model"], load_ckpt(out)["model"])  # never overwritten


def test_import_has_no_side_effects_and_help_works(monkeypatch, capsys):
    """The module run afresh under another name (as `import simclr` runs it) with an argv no parser accepts: it only
    defines things, prints nothing. `python simclr.py --help` through its `__main__` block lists the flags."""
    path = os.path.join(ROOT, "simclr.py")
    monkeypatch.setattr(sys, "argv", ["python", "--not-a-flag"])
    namespace = runpy.run_path(path, run_name="simclr_fresh_import")
    assert callable(namespace["main"]) and capsys.readouterr() == ("", "") and sys.argv == ["python", "--not-a-flag"]
    monkeypatch.setattr(sys, "argv", ["simclr.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--temperature" in out and "--max_steps_per_epoch" in out


def test_simclr_points_old_ifaclr_command_lines_to_ifaclr_py(monkeypatch):
    import simclr
    from common import config
    monkeypatch.setattr("sys.argv", ["simclr.py", "--method", "lwclr"])
    with pytest.raises(config.ConfigError, match="python ifaclr.py with the same flags"):
        simclr.main()
