"""Each script's main() wired as its paper says, run in-process for a few steps with spies on the shared calls:
the learning rate of every step against the hand-computed schedule (warmup from 0, the peak after it), the EMA
teacher against the hand-computed mix of the right networks with the right momentum, the quantity the optimizer
steps on, bit-exact resume of everything the checkpoint holds, and per-rank seeding.

These are the bugs that only smoke runs touch: a dropped warmup, an EMA with its arguments swapped (pulling the
online network to the target), a state missing from checkpoint.resume, every rank seeded alike.
"""
import inspect
import math
import os
import shutil
import sys

import pytest
import torch

import byol
import ifacd_distill
import ifaclr
import mocov3
import msbreg
import sdssl
import simclr
import simsiam_gsg
from common import config, dist, optim
from conftest import TINY, assert_same_tensors, load_ckpt, read_log

MODULES = {m.__name__: m for m in (simclr, mocov3, byol, simsiam_gsg, sdssl, msbreg, ifacd_distill, ifaclr)}
VIT = ["--arch", "vit_debug", "--patch_size", "8", "--num_heads", "2"]
FLAGS = {  # 2 epochs of 2 steps at global batch 8, 1 warmup epoch (so: steps 0, 1 warm up; 2, 3 decay)
    "simclr": [],
    "mocov3": ["--pred_hidden_dim", "64"],
    "byol": ["--pred_hidden_dim", "64"],
    "simsiam_gsg": ["--base", "byol", "--pred_hidden_dim", "16", "--proj_layers", "2"],
    "sdssl": VIT + ["--isd_hidden_dim", "32", "--pred_hidden_dim", "64"],
    "msbreg": ["--num_views", "2"],
    "ifaclr": VIT + ["--method", "simlwclr"],
}
ALL_STEPS = ["--epochs", "2", "--warmup_epochs", "1", "--eval_every", "0", "--save_every", "1"]


def argv(name, data_dir, out, *extra):
    if name == "ifacd_distill":
        return ["--dataset", "fake", "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--epochs", "2",
                "--max_steps_per_epoch", "2", "--log_every", "1", "--output_dir", out, "--save_every", "1", *extra]
    return ["--config", TINY, "--data_dir", data_dir, "--output_dir", out, *ALL_STEPS, *FLAGS[name], *extra]


def run_main(name, args, monkeypatch):
    """The script's main() in this process (its 1-process group is the session's; cleanup must not end it)."""
    monkeypatch.setattr(sys, "argv", [name + ".py"] + args)
    monkeypatch.setattr(dist, "cleanup", lambda: None)
    MODULES[name].main()
    return config.parse(MODULES[name].Config, args)


def cosine_with_warmup(step, peak, warmup=2, total=4):  # hand-written: linear from 0, then cosine to 0
    return peak * step / warmup if step < warmup else peak * 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                               / (total - warmup)))


def ema_momentum(t, m0, total=4):  # BYOL / MoCo v3: 1 - (1 - m0)(1 + cos(pi t / T)) / 2
    return 1 - (1 - m0) * (1 + math.cos(math.pi * t / total)) / 2


class Spy:
    """Records every optimizer step (the loss it steps on and each group's lr) and every EMA update, checking
    each update against the hand-computed mix as it happens."""

    def __init__(self, monkeypatch, module):
        self.steps, self.emas, self.optimizer = [], [], None
        real_step = optim.step

        def step(loss, optimizer, scaler, *args, **kwargs):
            self.optimizer = optimizer
            self.steps.append((float(loss.detach()), {g["name"]: g["lr"] for g in optimizer.param_groups}))
            return real_step(loss, optimizer, scaler, *args, **kwargs)
        monkeypatch.setattr(optim, "step", step)
        if hasattr(module, "ema_update"):
            real_ema = module.ema_update

            def ema(target, online, m):
                assert not any(p.requires_grad for p in target.parameters()), "the first argument must be the target"
                if self.optimizer is not None:  # GSG's first update comes before the first optimizer step
                    trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
                    assert any(id(p) in trained for p in online.parameters()), "the second must be the trained network"
                before = {k: v.detach().clone().double() for k, v in target.named_parameters()}
                theta = {k: v.detach().clone().double() for k, v in online.named_parameters()}
                real_ema(target, online, m)
                for k, v in target.named_parameters():
                    torch.testing.assert_close(v.double(), m * before[k] + (1 - m) * theta[k], rtol=0, atol=1e-6)
                self.emas.append(m)
            monkeypatch.setattr(module, "ema_update", ema)


# ----- learning rate and EMA, step by step -----

@pytest.mark.parametrize("name", sorted(FLAGS))
def test_lr_and_ema_follow_the_schedule(process_group, image_folder, tmp_path, monkeypatch, name):
    module = MODULES[name]
    spy = Spy(monkeypatch, module)
    cfg = run_main(name, argv(name, image_folder, str(tmp_path)), monkeypatch)
    assert len(spy.steps) == 4
    lrs = [lr for _, groups in spy.steps for lr in [groups["decay"]]]
    peak = cfg.lr * 8 / 256 * (cfg.num_views if name == "msbreg" else 1)  # each paper's scaling rule, by hand
    if name == "simsiam_gsg":  # SimSiam: the lr changes per epoch (warmup epoch 0 at 0, then the cosine's start)
        assert lrs == pytest.approx([0.0, 0.0, peak, peak], abs=1e-12)
        assert [g["predictor_decay"] for _, g in spy.steps] == pytest.approx([peak] * 4)  # --fix-pred-lr
    else:
        assert lrs == pytest.approx([cosine_with_warmup(s, peak) for s in range(4)], abs=1e-12)
    expected_m = {"mocov3": [ema_momentum(s + 1, 0.99) for s in range(4)],  # m(t + 1) after step t (docstring)
                  "byol": [ema_momentum(s, 0.996) for s in range(4)],  # tau of the step just taken
                  "sdssl": [ema_momentum(s, 0.996) for s in range(4)],
                  "msbreg": [ema_momentum(s, 0.996) for s in range(4)],
                  "simsiam_gsg": [0.99] * 4,  # gsg/builder.py: constant, before each forward
                  "simclr": [], "ifaclr": []}[name]
    assert spy.emas == pytest.approx(expected_m, abs=1e-12)
    # the collapse monitor (common.log.output_std) in every epoch's row: between 0 (collapsed) and 1
    assert all(0 < row["out_std"] <= 1 for row in read_log(str(tmp_path)))


@pytest.mark.parametrize("flags, factor", [([], 2.0), (["--sum_directions", "false"], 1.0)],
                         ids=["tf_code_sum", "mean"])
def test_simclr_steps_on_the_sum_of_both_directions(process_group, image_folder, tmp_path, monkeypatch, flags,
                                                    factor):
    """SimCLR's TF code optimises loss_a + loss_b, the two views' mean cross-entropies: 2x the mean over the 2N
    anchors that simclr_loss returns (which matters for SGD / LARS steps on biases and BN, and against weight decay).
    SDSSL's ViT baseline (PyTorch CE over 2N rows) takes the mean."""
    spy, values = Spy(monkeypatch, simclr), []
    real = simclr.simclr_loss

    def recorded(*args):
        loss = real(*args)
        values.append(float(loss.detach()))
        return loss
    monkeypatch.setattr(simclr, "simclr_loss", recorded)
    run_main("simclr", argv("simclr", image_folder, str(tmp_path), "--epochs", "1", *flags), monkeypatch)
    assert len(values) == len(spy.steps) == 2
    assert [loss for loss, _ in spy.steps] == pytest.approx([factor * v for v in values], rel=1e-6)


def test_ifacd_lr_steps_down_at_the_milestones(process_group, tmp_path, monkeypatch):
    teacher = str(tmp_path / "teacher")
    run_main("ifacd_distill", argv("ifacd_distill", "", teacher, "--distill", "none", "--student", "resnet8",
                                   "--epochs", "1"), monkeypatch)
    spy = Spy(monkeypatch, ifacd_distill)
    run_main("ifacd_distill", argv("ifacd_distill", "", str(tmp_path / "kd"), "--distill", "kd", "--teacher", "resnet8",
                                   "--teacher_ckpt", os.path.join(teacher, "last.pt"), "--student", "resnet8",
                                   "--lr_milestones", "1"), monkeypatch)
    peak = 0.05 * 8 / 64  # 0.05 at batch 64, scaled linearly
    assert [g["decay"] for _, g in spy.steps] == pytest.approx([peak, peak, peak / 10, peak / 10], abs=1e-12)


# ----- resume: every state the checkpoint holds, for every script -----

@pytest.mark.parametrize("name", sorted(MODULES))
def test_resume_is_bit_exact(process_group, image_folder, tmp_path, monkeypatch, name):
    """2 epochs straight vs the epoch-1 checkpoint of that run resumed for the second: every tensor of every state
    (model, teacher, optimizer, scaler, loss_state) and the step count are identical. A state left out of the
    script's checkpoint.resume call (a fresh teacher, optimizer or CRD bank) fails here."""
    extra = []
    if name == "ifacd_distill":  # CRD: a teacher, memory banks, Z and sampled negatives to carry across
        teacher = str(tmp_path / "teacher")
        run_main(name, argv(name, "", teacher, "--distill", "none", "--student", "resnet8", "--epochs", "1"),
                 monkeypatch)
        extra = ["--distill", "crd", "--teacher", "resnet8", "--teacher_ckpt", os.path.join(teacher, "last.pt"),
                 "--student", "resnet8", "--crd_negatives", "16", "--crd_momentum", "0.9"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_main(name, argv(name, image_folder, straight, *extra), monkeypatch)
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))
    run_main(name, argv(name, image_folder, resumed, *extra), monkeypatch)
    a, b = load_ckpt(straight), load_ckpt(resumed)
    states = [k for k in a if isinstance(a[k], dict) and k != "config"]
    assert {"model", "optimizer", "scaler"} <= set(states)
    assert ("teacher" in states) == (name in ("mocov3", "byol", "sdssl", "msbreg", "simsiam_gsg"))
    for key in states:
        assert_same_tensors(a[key], b[key], key)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    first = load_ckpt(straight, "epoch_0001.pt")
    assert not torch.equal(next(iter(a["model"].values())), next(iter(first["model"].values()))) or \
        any(not torch.equal(a["model"][k], first["model"][k]) for k in a["model"])  # the second epoch did train


# ----- per-rank seeding -----

@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_script_seeds_each_epoch_per_rank(name):
    """CONVENTIONS 10: seed + 1000 * epoch + rank at the start of every epoch (tests/test_dist.py checks that two
    ranks then draw different views); every script must pass its own rank."""
    assert "data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)" in inspect.getsource(MODULES[name].main)


def test_output_std_is_the_collapse_monitor():
    """1/sqrt(D) for outputs spread evenly over the sphere's axes, 0 when every output is the same vector."""
    from common.log import output_std
    d = 64
    spread = torch.eye(d).repeat(50, 1) * torch.randn(50 * d, 1).sign()  # (3200, D): +-e_i, every axis alike
    assert float(output_std(spread)) == pytest.approx(d ** -0.5, rel=0.02)
    assert float(output_std(torch.randn(1, d).repeat(100, 1))) == 0.0
    assert float(output_std(torch.stack([spread, spread]))) == pytest.approx(float(output_std(spread)))
