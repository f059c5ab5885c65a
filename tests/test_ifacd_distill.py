"""ifacd_distill.py: KD's and IFACD's losses against naive references, the frozen teacher, the slides' parameter
table, the IFACD head, the loop's runs: a resnet14 teacher and bit-exact resumes of CRD (banks, Z) and of RepDistiller's
init stage (AB) in this process, every RepDistiller method on the gloo pool's 2 ranks, one 2-rank launch of IFACD
(smoke, log, parameter counts) resumed bit-exactly on the pool; clear errors. (The baselines' losses, CRD's included:
tests/test_distill_losses.py; the table runner: tests/runners/test_run_table_ifacd.py.)"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from common import config, data, dist
from common.cifar_models import build_cifar_model
from helpers import (assert_same_tensors, copy_epoch_1, launch, load_ckpt, naive_supcon, read_log, run_script)

import distill_losses
import ifacd_distill as M

PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "resnet110-resnet20"]
# S000 'Number of Parameters', every row (millions; teacher + student + heads, CRD's and IFACD's heads twice,
# METHODS.md section 10). AT, NST, PKT, RKD and SP own no parameters: their rows equal kd's.
SLIDES_PARAMS = {"kd": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01], "crd": [3.02, 2.87, 13.69, 1.17, 8.80, 2.05],
                 "ifacd1": [3.06, 2.91, 14.22, 1.18, 8.93, 2.06], "ifacd2": [3.09, 2.94, 14.75, 1.19, 9.07, 2.07],
                 "hint": [2.96, 2.83, 13.49, 1.14, 8.68, 2.02], "correlation": [2.99, 2.85, 13.56, 1.16, 8.73, 2.03],
                 "vid": [3.02, 2.88, 15.25, 1.16, 8.93, 2.03], "attention": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01],
                 "nst": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01], "pkt": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01],
                 "rkd": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01], "similarity": [2.96, 2.82, 13.43, 1.14, 8.67, 2.01]}


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(*argv):
    return config.parse(M.Config, list(argv))


# ------------------------------------------------ losses ------------------------------------------------

def test_kd_loss_matches_naive_value_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64)
    T = 4.0
    naive = 0.0
    for i in range(5):
        p_t = [math.exp(v / T) / sum(math.exp(u / T) for u in t[i].tolist()) for v in t[i].tolist()]
        log_z = torch.logsumexp(s[i] / T, 0)
        naive = naive + sum(p_t[c] * (math.log(p_t[c]) - (s[i, c] / T - log_z)) for c in range(7))
    naive = naive * T * T / 5
    ours = M.kd_loss(s, t, T)
    assert ours.dtype == torch.float64 and torch.allclose(ours, naive)
    g_ours, = torch.autograd.grad(ours, s)
    g_naive, = torch.autograd.grad(naive, s)
    assert torch.allclose(g_ours, g_naive)
    assert M.kd_loss(t, t, T).abs() < 1e-12  # identical logits: zero


def test_ifacd_loss_matches_naive_supcon(process_group):
    torch.manual_seed(0)
    f = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    ours = M.ifacd_loss(f, 0.07)
    naive = naive_supcon(f, 0.07)  # it normalises, as ifacd_loss
    assert ours.dtype == torch.float64 and torch.allclose(ours, naive)
    assert torch.allclose(torch.autograd.grad(ours, f)[0], torch.autograd.grad(naive, f)[0])
    assert torch.allclose(M.ifacd_loss(3 * f, 0.07), ours)  # scale-free: the features are normalised


def test_ifacd_loss_analytic_case(process_group):
    """Views of an image identical, images orthogonal: loss = log(V - 1 + (n - 1) V e^{-1/tau}) exactly."""
    n, V, tau = 3, 3, 0.5
    f = torch.eye(n, dtype=torch.float64)[:, None, :].expand(n, V, n)
    expected = math.log(V - 1 + (n - 1) * V * math.exp(-1 / tau))
    assert abs(M.ifacd_loss(f, tau).item() - expected) < 1e-12


# ------------------------------------- heads and the slides' parameter table -------------------------------------

def test_parameter_counts_reproduce_the_slides_table(feature_shapes_once):
    """Every row of S000's 'Number of Parameters', counted as the slides do (CRD's and IFACD's heads twice, FitNet's
    regressor, CC's embeddings and VID's regressors once); counted once, IFACD1 on wrn_40_2 -> wrn_16_2 is 3.01M and
    CRD 2.99M (METHODS.md section 10)."""
    for col, pair in enumerate(PAIRS):
        t_name, s_name = pair.split("-")
        teacher, student = build_cifar_model(t_name), build_cifar_model(s_name)
        for row in SLIDES_PARAMS:
            method, layers = ("ifacd", row[-1]) if row.startswith("ifacd") else (row, "2")
            cfg = cfg_of("--distill", method, "--ifacd_layers", layers, "--teacher", t_name, "--student", s_name)
            head = M.build_method(cfg, student, teacher, 8).head
            ours, slides = M.param_counts(M.Distiller(student, head), teacher, torch.nn.Module(),
                                          method)
            assert round(slides / 1e6, 2) == SLIDES_PARAMS[row][col], (row, pair, slides)
            if pair == PAIRS[0] and row in ("ifacd1", "crd"):
                once = (ours + sum(p.numel() for p in teacher.parameters())) / 1e6
                assert round(once, 2) == {"ifacd1": 3.01, "crd": 2.99}[row], (row, once)


def test_ifacd_head_picks_the_last_teacher_layers():
    cfg = cfg_of("--distill", "ifacd", "--ifacd_layers", "3", "--teacher", "wrn_40_2", "--student", "resnet8")
    teacher, student = build_cifar_model("wrn_40_2").eval(), build_cifar_model("resnet8")
    heads = M.build_method(cfg, student, teacher, 8).head.eval()
    x = torch.randn(2, 3, 32, 32)
    t, s = teacher(x, features=True), student(x, features=True)
    z = heads(s, t)
    assert z.shape == (2, 4, 128)
    pooled = F.adaptive_avg_pool2d(t.last_stage[-2], 1).flatten(1)  # block3.layer.5.relu2
    assert torch.allclose(z[:, 2], heads.proj_t(heads.rescalers[1](pooled)))
    assert torch.allclose(z[:, 0], heads.proj_s(s.pooled))


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient(process_group, cifar_root):
    """Two real training steps (train_one_epoch): the teacher's weights and BN statistics do not move, it stays in
    eval mode and never receives a gradient; the student and the heads do train."""
    cfg = cfg_of("--distill", "ifacd", "--teacher", "resnet8", "--student", "resnet8", "--ifacd_layers", "2",
                 "--max_steps_per_epoch", "2", "--batch_size", "8", "--log_every", "1")
    ctx = dist.setup("cpu")
    torch.manual_seed(0)
    teacher = build_cifar_model("resnet8").requires_grad_(False).eval()
    student = build_cifar_model("resnet8")
    method = M.build_method(cfg, build_cifar_model("resnet8"), teacher, 8)
    model = M.Distiller(student, method.head)
    before_t, before_s = [{k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, model)]
    base = data.build_dataset("cifar100", cifar_root, "train", M.augment.linear_train_transform(32))
    loader = data.train_loader(distill_losses.DistillSet(base, 0), 8, ctx, 0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = M.optim.grad_scaler("none", ctx.device)
    step, row = M.train_one_epoch(dist.ddp(model, ctx), teacher, method, torch.nn.Module(), loader,
                                  optimizer, scaler, cfg, ctx, 0, 0, 0.1)
    assert step == 2 and math.isfinite(row["loss"]) and row["distill"] > 0 and row["kl"] > 0
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert_same_tensors(before_t, teacher.state_dict())
    after = model.state_dict()
    assert not torch.equal(before_s["student.conv1.weight"], after["student.conv1.weight"])
    assert not torch.equal(before_s["heads.rescalers.0.0.weight"], after["heads.rescalers.0.0.weight"])


# ------------------------------------------------ runs ------------------------------------------------

def run_args(root, out, *extra):
    return ["--dataset", "cifar100", "--data_dir", root, "--download", "false", "--output_dir", out,
            "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--epochs", "2",
            "--max_steps_per_epoch", "2", "--log_every", "1", *extra]


@pytest.fixture(scope="module")
def teacher_ckpt(process_group, cifar_root, tmp_path_factory):
    """A resnet14 teacher: this script with --distill none, one epoch (in this process)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    run_script("ifacd_distill", run_args(cifar_root, out, "--distill", "none", "--student", "resnet14", "--epochs",
                                         "1"))
    blob = load_ckpt(out)
    assert blob["epoch"] == 1 and all(k.startswith("student.") for k in blob["model"])
    return os.path.join(out, "last.pt")


def test_crd_resume_is_bit_exact(process_group, cifar_root, teacher_ckpt, tmp_path):
    """In this process, 2 epochs straight vs the epoch-1 checkpoint resumed: identical model, optimizer and CRD
    banks + Z."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    crd = ["--distill", "crd", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--student", "resnet8",
           "--crd_negatives", "16"]
    run_script("ifacd_distill", run_args(cifar_root, straight, *crd, "--save_every", "1"))
    os.makedirs(resumed)
    blob = load_ckpt(straight, "epoch_0001.pt")
    torch.save({**blob, "train_time_s": 1000.0}, os.path.join(resumed, "last.pt"))  # as if epoch 0 took 1000 s
    out = run_script("ifacd_distill", run_args(cifar_root, resumed, *crd))
    assert "resumed from" in out and "at epoch 1" in out
    a, b, first = load_ckpt(straight), load_ckpt(resumed), load_ckpt(straight, "epoch_0001.pt")
    for key in ("model", "optimizer", "loss_state"):
        assert_same_tensors(a[key], b[key], key)
    assert a["best_top1"] == b["best_top1"]
    assert a["loss_state"]["bank_s"].shape == (40, 128) and (a["loss_state"]["z"] > 0).all()
    assert torch.equal(a["loss_state"]["z"], first["loss_state"]["z"])  # Z fixed at the first batch
    assert not torch.equal(a["loss_state"]["bank_t"], first["loss_state"]["bank_t"])  # banks move
    assert read_log(resumed)[0]["epoch"] == 1 and read_log(straight)[-1]["distill"] > 0
    # train_time_s carries over a resume: the checkpoint's (1000 s) plus the resumed epoch's
    assert first["train_time_s"] == read_log(straight)[0]["train_time_s"]
    assert 1000 < read_log(resumed)[0]["train_time_s"] < 1000 + read_log(straight)[-1]["train_time_s"] + 60


# ------------------------------------ RepDistiller's init stage (AB, FT, FSP) ------------------------------------

def test_init_stage_resume_is_bit_exact(process_group, cifar_root, teacher_ckpt, tmp_path):
    """AB, 2 init epochs + 1 main epoch, straight vs resumed (in this process) from the checkpoint after init epoch
    -2: identical student, connectors and both optimizers. The init stage trains the connectors and the student's
    feature modules but not its classifier; it is logged as epochs -2, -1 and never evaluated."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    ab = ["--distill", "abound", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--student", "resnet8x4",
          "--init_epochs", "2", "--epochs", "1"]  # resnet8x4 has twice resnet14's widths: 1x1 conv + BN connectors
    run_script("ifacd_distill", run_args(cifar_root, straight, *ab, "--save_every", "1"))
    rows = read_log(straight)
    assert [r["epoch"] for r in rows] == [-2, -1, 0] and ["test_top1" in r for r in rows] == [False, False, True]
    assert rows[0]["loss"] > 0 and rows[2]["distill"] == 0  # AB adds nothing to the main loop
    first, after_init = load_ckpt(straight, "epoch_-001.pt"), load_ckpt(straight, "epoch_0000.pt")
    assert first["epoch"] == -1 and after_init["epoch"] == 0 and first["step"] == after_init["step"] == 0
    for key, moved in (("student.conv1.weight", True), ("student.layer3.0.conv2.weight", True),
                       ("student.fc.weight", False)):
        assert torch.equal(first["model"][key], after_init["model"][key]) != moved, key
    assert not torch.equal(first["loss_state"]["connectors.2.conv.weight"],
                           after_init["loss_state"]["connectors.2.conv.weight"])
    os.makedirs(resumed)
    torch.save(first, os.path.join(resumed, "last.pt"))
    out = run_script("ifacd_distill", run_args(cifar_root, resumed, *ab))
    assert "resumed from" in out and "at epoch -1" in out
    a, b = load_ckpt(straight), load_ckpt(resumed)
    for key in ("model", "optimizer", "loss_state", "init_optimizer"):
        assert_same_tensors(a[key], b[key], key)
    assert [r["epoch"] for r in read_log(resumed)] == [-1, 0]


def _each_method(runs, common, out_root):
    """On each pool rank: every run in turn, the group kept between runs; after an init stage, the modules it trained
    (outside DDP) must be the same on both ranks, and so must the loss state. Returns the names of the runs done."""
    seen, init_epoch, done = {}, M.train_init_epoch, []

    def spy(model, teacher, method, *args):  # keep the init stage's modules to compare the ranks later
        seen.update(model=model, state=method.state or torch.nn.Module())
        return init_epoch(model, teacher, method, *args)
    M.train_init_epoch = spy
    try:
        for name, argv in runs:
            seen.clear()
            run_script("ifacd_distill", [*common, "--output_dir", os.path.join(out_root, name), *argv])
            if seen:  # trained outside DDP in the init stage: the same weights on both ranks, the same loss state
                flat = torch.cat([t.detach().flatten().float() for t in [*seen["model"].parameters(),
                                  *seen["state"].state_dict().values()]])
                both = dist.gather(flat[None])
                assert torch.equal(both[0], both[1]), name + ": the ranks differ after the init stage"
            done.append(name)
    finally:
        M.train_init_epoch = init_epoch
    return done


@pytest.mark.sweep
def test_each_repdistiller_method_on_two_ranks(cifar_root, teacher_ckpt, gloo_pool, tmp_path):
    """Every method added for RepDistiller's benchmark on a cross-family pair (the resnet14 teacher -> MobileNetV2,
    ShuffleV1 or wrn_16_1), 2 ranks (the gloo pool), 1 init epoch (AB, FT, FSP) + 1 main epoch. FSP and KDSVD need
    equal channel counts per stage (RepDistiller refuses or crashes on other pairs): wrn_16_1's are resnet14's."""
    runs = {"abound": ["--distill", "abound", "--student", "ShuffleV1"],
            "factor": ["--distill", "factor", "--student", "MobileNetV2"],
            "fsp": ["--distill", "fsp", "--student", "wrn_16_1"],
            "kdsvd": ["--distill", "kdsvd", "--student", "wrn_16_1"],
            "crd_relax": ["--distill", "crd", "--crd_mode", "relax", "--crd_negatives", "16", "--student", "wrn_16_1"]}
    common = run_args(cifar_root, "unused", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--epochs", "1",
                      "--init_epochs", "1")
    common = common[:common.index("--output_dir")] + common[common.index("--output_dir") + 2:]
    for done in gloo_pool.run(_each_method, list(runs.items()), common, str(tmp_path)):
        assert done == list(runs)
    for name in runs:
        rows = read_log(str(tmp_path / name))
        two_stage = name in ("abound", "factor", "fsp")
        assert [r["epoch"] for r in rows] == ([-1, 0] if two_stage else [0]), name
        assert all(math.isfinite(r["loss"]) for r in rows) and 0 <= rows[-1]["test_top1"] <= 100, name
        assert (rows[-1]["distill"] > 0) == (name in ("factor", "kdsvd", "crd_relax")), (name, rows[-1])
        blob = load_ckpt(str(tmp_path / name))
        assert blob["epoch"] == 1 and ("init_optimizer" in blob) == two_stage, name


IFACD = ("--distill", "ifacd", "--teacher", "resnet14", "--student", "resnet8", "--ifacd_layers", "3", "--save_every",
         "1")


@pytest.fixture(scope="module")
def run(cifar_root, teacher_ckpt, tmp_path_factory):
    """IFACD, 2 ranks (launched), 2 epochs, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("ifacd") / "straight")
    launch("ifacd_distill.py", run_args(cifar_root, out, *IFACD, "--teacher_ckpt", teacher_ckpt))
    return out


@pytest.mark.e2e
def test_ifacd_two_ranks_two_epochs(run):
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) and r["distill"] > 0 for r in rows)
    assert all(0 <= r["test_top1"] <= r["best_test_top1"] <= 100 and r["peak_rss_gb"] > 0 for r in rows)
    # the whole run's wall time, cumulative; no GPU memory figure on the CPU (the table says "cpu")
    assert 0 < rows[0]["train_time_s"] < rows[1]["train_time_s"] and "peak_mem_reserved_gb" not in rows[1]
    # resnet8 + 3 rescalers (64 -> 64) + proj_s, proj_t (64 -> 128), BN1d everywhere; the slides add the
    # resnet14 teacher and count the heads twice.
    heads = 3 * (64 * 64 + 64 + 128) + 2 * (64 * 128 + 128 + 256)
    assert rows[-1]["params"] == 83_892 + heads and rows[-1]["params_slides"] == 181_108 + 83_892 + 2 * heads
    blob = load_ckpt(run)
    assert blob["epoch"] == 2 and blob["step"] == 4 and blob["loss_state"] == {}
    assert any(k.startswith("heads.rescalers.2.") for k in blob["model"])


@pytest.mark.e2e
def test_ifacd_two_ranks_resume_is_bit_exact(run, cifar_root, teacher_ckpt, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool): the same student, heads and
    optimizer."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "ifacd_distill",
                        run_args(cifar_root, resumed, *IFACD, "--teacher_ckpt", teacher_ckpt))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "optimizer", "loss_state"):
        assert_same_tensors(a[key], b[key], key)
    assert read_log(resumed)[0]["epoch"] == 1


# ------------------------------------------------ clear errors ------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--student", "resnet19"], "student='resnet19' is not one of"),
    (["--distill", "kd"], "--distill kd needs --teacher_ckpt"),
    (["--distill", "kd", "--teacher_ckpt", "MISSING"], "does not exist"),
    (["--distill", "kd", "--teacher_ckpt", "JUNK"], "is unreadable (UnpicklingError): it is truncated, corrupt or not "
                                                    "a PyTorch checkpoint"),
    (["--distill", "kd", "--teacher", "resnet8", "--teacher_ckpt", "TEACHER"],
     "holds a resnet14, not --teacher resnet8"),
    (["--distill", "kd", "--teacher", "resnet20", "--teacher_ckpt", "BARE"], "does not fit resnet20"),
    (["--distill", "ifacd", "--teacher", "resnet14", "--teacher_ckpt", "TEACHER", "--ifacd_layers", "5"],
     "resnet14 has 4 ReLU outputs"),
    (["--distill", "hint", "--teacher", "resnet14", "--teacher_ckpt", "TEACHER", "--hint_layer", "7"],
     "hint_layer=7: choose 0..3"),
    (["--distill", "fsp", "--teacher", "resnet14", "--teacher_ckpt", "TEACHER", "--student", "resnet8x4"],
     "fsp: the student's and the teacher's channel counts differ"),
    (["--distill", "abound", "--teacher", "resnet14", "--teacher_ckpt", "TEACHER", "--student", "MobileNetV2"],
     "abound: the student has 4 stage outputs and the teacher 3"),
    (["--distill", "abound", "--teacher_ckpt", "TEACHER", "--init_epochs", "-1"], "init_epochs=-1"),
])
def test_bad_input_is_one_clear_line(process_group, cifar_root, teacher_ckpt, tmp_path, monkeypatch, capsys,
                                     extra, message):
    bare = str(tmp_path / "bare.pt")
    torch.save(build_cifar_model("resnet8").state_dict(), bare)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    paths = {"TEACHER": teacher_ckpt, "BARE": bare, "MISSING": str(tmp_path / "nope.pt"), "JUNK": str(junk)}
    argv = run_args(cifar_root, str(tmp_path / "out"), "--student", "resnet8", *[paths.get(a, a) for a in extra])
    monkeypatch.setattr(sys, "argv", ["ifacd_distill.py"] + argv)
    with pytest.raises(SystemExit) as exit_:
        config.run(M.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_teacher_loads_from_a_bare_state_dict(tmp_path):
    model = build_cifar_model("resnet8")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": model.state_dict(), "epoch": 240}, tmp_path / "repdistiller.pt")  # RepDistiller's layout
    for name in ("bare.pt", "repdistiller.pt"):
        cfg = cfg_of("--distill", "kd", "--teacher", "resnet8", "--teacher_ckpt", str(tmp_path / name))
        teacher = M.load_teacher(cfg.teacher_ckpt, cfg.teacher, 100, torch.device("cpu"))
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert_same_tensors(teacher.state_dict(), model.state_dict())
