"""ifacd_distill.py: losses against naive references, CRD's memory and sampler, the frozen teacher, the slides'
parameter table, 2-epoch runs (one on 2 ranks), bit-exact resume with CRD's banks, clear errors, the table runner."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common import config, data, dist
from common.cifar_models import build_cifar_model
from conftest import ROOT, assert_same_tensors, launch, load_ckpt, read_log

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


def naive_supcon(z, tau):
    """SupCon 'all' without labels, anchor by anchor (z: (n, V, D) already normalised)."""
    n, V, _ = z.shape
    flat = [(i, v) for i in range(n) for v in range(V)]
    total = 0.0
    for i, v in flat:
        others = [(j, w) for j, w in flat if (j, w) != (i, v)]
        log_den = torch.logsumexp(torch.stack([z[i, v] @ z[j, w] / tau for j, w in others]), 0)
        pos = [z[i, v] @ z[i, w] / tau - log_den for w in range(V) if w != v]
        total = total - sum(pos) / len(pos)
    return total / len(flat)


def test_ifacd_loss_matches_naive_supcon(process_group):
    torch.manual_seed(0)
    f = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    ours = M.ifacd_loss(f, 0.07)
    naive = naive_supcon(F.normalize(f, dim=2), 0.07)
    assert ours.dtype == torch.float64 and torch.allclose(ours, naive)
    assert torch.allclose(torch.autograd.grad(ours, f)[0], torch.autograd.grad(naive, f)[0])
    assert torch.allclose(M.ifacd_loss(3 * f, 0.07), ours)  # scale-free: the features are normalised


def test_ifacd_loss_analytic_case(process_group):
    """Views of an image identical, images orthogonal: loss = log(V - 1 + (n - 1) V e^{-1/tau}) exactly."""
    n, V, tau = 3, 3, 0.5
    f = torch.eye(n, dtype=torch.float64)[:, None, :].expand(n, V, n)
    expected = math.log(V - 1 + (n - 1) * V * math.exp(-1 / tau))
    assert abs(M.ifacd_loss(f, tau).item() - expected) < 1e-12


def naive_crd(v_s, v_t, bank_s, bank_t, idx, neg, tau, z=None):
    """CRD's loss sample by sample; z = (Z_s, Z_t), or None to fix them from this batch (mean score x N)."""
    N, K, B = bank_s.shape[0], neg.shape[1], v_s.shape[0]
    e_s = torch.stack([torch.stack([torch.exp(bank_t[j] @ v_s[i] / tau) for j in [idx[i]] + neg[i].tolist()])
                       for i in range(B)])
    e_t = torch.stack([torch.stack([torch.exp(bank_s[j] @ v_t[i] / tau) for j in [idx[i]] + neg[i].tolist()])
                       for i in range(B)])
    z = z or (e_s.detach().mean() * N, e_t.detach().mean() * N)
    loss = 0.0
    for e, zz in ((e_s, z[0]), (e_t, z[1])):
        for i in range(B):
            p = e[i] / zz
            loss = loss - torch.log(p[0] / (p[0] + K / N + 1e-7))
            loss = loss - sum(torch.log((K / N) / (p[k] + K / N + 1e-7)) for k in range(1, K + 1))
    return loss / B, z


def test_crd_loss_matches_naive_on_a_tiny_bank(process_group):
    torch.manual_seed(0)
    N, D, B, K, tau = 10, 4, 3, 4, 0.07
    memory = distill_losses.CRDMemory(N, D, momentum=0.5)
    bank_s, bank_t = memory.bank_s.clone(), memory.bank_t.clone()
    v_s = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
    v_t = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
    idx, neg = torch.tensor([0, 4, 7]), torch.randint(0, N, (B, K))
    sample = torch.cat([idx[:, None], neg], dim=1)  # the positive (the image itself), then the negatives
    ours = distill_losses.crd_loss(v_s, v_t, memory, sample, tau)
    naive, z = naive_crd(v_s, v_t, bank_s, bank_t, idx.tolist(), neg, tau)
    assert torch.allclose(ours, naive, rtol=1e-5)
    assert torch.allclose(memory.z, torch.stack(z))
    g_ours = torch.autograd.grad(ours, [v_s, v_t])
    g_naive = torch.autograd.grad(naive, [v_s, v_t])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_ours, g_naive))
    # The bank update: m * old + (1 - m) * v, re-normalised, only the batch's rows.
    memory.update(v_s.detach(), v_t.detach(), idx)
    assert torch.allclose(memory.bank_s[idx], F.normalize(0.5 * bank_s[idx] + 0.5 * v_s.detach(), dim=1))
    assert torch.allclose(memory.bank_t[idx], F.normalize(0.5 * bank_t[idx] + 0.5 * v_t.detach(), dim=1))
    rest = torch.tensor([i for i in range(N) if i not in idx.tolist()])
    assert torch.equal(memory.bank_s[rest], bank_s[rest])
    # Z stays fixed after the first batch.
    z_first = memory.z.clone()
    second = distill_losses.crd_loss(v_s, v_t, memory, sample, tau)
    assert torch.equal(memory.z, z_first)
    naive2, _ = naive_crd(v_s, v_t, memory.bank_s, memory.bank_t, idx.tolist(), neg, tau, z=tuple(z_first))
    assert torch.allclose(second, naive2, rtol=1e-5)


def test_crd_sampler_draws_other_class_negatives():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    base = data.ArrayDataset(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), labels)
    torch.manual_seed(0)
    for k, distinct in ((6, True), (9, False)):  # class 0 has 7 other-class images: 9 > 7 draws with replacement
        ds = distill_losses.DistillSet(base, k)
        for i in range(10):
            _, y, index, sample = ds[i]
            pos, neg = sample[0], sample[1:]
            assert index == i == pos and neg.shape == (k,) and (labels[neg] != y).all()  # exact: the positive is i
            assert (len(set(neg.tolist())) == k) == distinct or y == 3
    assert distill_losses.DistillSet(base, 0)[3][3].numel() == 0


def test_crd_relax_mode_draws_the_positive_from_the_class():
    """RepDistiller's --mode relax: the positive is a uniformly drawn image of the anchor's class (itself included),
    the negatives are drawn as in exact mode."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    base = data.ArrayDataset(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), labels)
    ds = distill_losses.DistillSet(base, 4, relax=True)
    torch.manual_seed(0)
    positives = torch.stack([ds[0][3][0] for _ in range(600)])  # class 0 = images 0, 3, 6
    assert set(positives.tolist()) == {0, 3, 6}
    assert (torch.bincount(positives, minlength=7)[[0, 3, 6]] > 150).all()  # ~200 each
    assert all(ds[9][3][0] == 9 for _ in range(5))  # a class of one: its only image
    assert all((labels[ds[i][3][1:]] != labels[i]).all() for i in range(10))


# ------------------------------------- heads and the slides' parameter table -------------------------------------

def test_parameter_counts_reproduce_the_slides_table():
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


# ------------------------------------------------ end to end ------------------------------------------------

def run_args(root, out, *extra):
    return ["--dataset", "cifar100", "--data_dir", root, "--download", "false", "--output_dir", out,
            "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--epochs", "2",
            "--max_steps_per_epoch", "2", "--log_every", "1", *extra]


@pytest.fixture(scope="module")
def teacher_ckpt(cifar_root, tmp_path_factory):
    """A resnet14 teacher: this script with --distill none, one epoch (single process)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    launch("ifacd_distill.py", run_args(cifar_root, out, "--distill", "none", "--student", "resnet14",
                                        "--epochs", "1"), nproc=0)
    blob = load_ckpt(out)
    assert blob["epoch"] == 1 and all(k.startswith("student.") for k in blob["model"])
    return os.path.join(out, "last.pt")


def test_ifacd_two_ranks_two_epochs(cifar_root, teacher_ckpt, tmp_path):
    out = str(tmp_path / "ifacd")
    launch("ifacd_distill.py", run_args(cifar_root, out, "--distill", "ifacd", "--teacher", "resnet14",
                                        "--teacher_ckpt", teacher_ckpt, "--student", "resnet8", "--ifacd_layers", "3"))
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) and r["distill"] > 0 for r in rows)
    assert all(0 <= r["test_top1"] <= r["best_test_top1"] <= 100 and r["peak_rss_gb"] > 0 for r in rows)
    # the whole run's wall time, cumulative; no GPU memory figure on the CPU (the table says "cpu")
    assert 0 < rows[0]["train_time_s"] < rows[1]["train_time_s"] and "peak_mem_reserved_gb" not in rows[1]
    # resnet8 + 3 rescalers (64 -> 64) + proj_s, proj_t (64 -> 128), BN1d everywhere; the slides add the
    # resnet14 teacher and count the heads twice.
    heads = 3 * (64 * 64 + 64 + 128) + 2 * (64 * 128 + 128 + 256)
    assert rows[-1]["params"] == 83_892 + heads and rows[-1]["params_slides"] == 181_108 + 83_892 + 2 * heads
    blob = load_ckpt(out)
    assert blob["epoch"] == 2 and blob["step"] == 4 and blob["loss_state"] == {}
    assert any(k.startswith("heads.rescalers.2.") for k in blob["model"])


def test_crd_resume_is_bit_exact(cifar_root, teacher_ckpt, tmp_path):
    """2 epochs straight vs the epoch-1 checkpoint relaunched: identical model, optimizer and CRD banks + Z."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    crd = ["--distill", "crd", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--student", "resnet8",
           "--crd_negatives", "16"]
    launch("ifacd_distill.py", run_args(cifar_root, straight, *crd, "--save_every", "1"), nproc=0)
    os.makedirs(resumed)
    blob = load_ckpt(straight, "epoch_0001.pt")
    torch.save({**blob, "train_time_s": 1000.0}, os.path.join(resumed, "last.pt"))  # as if epoch 0 took 1000 s
    run = launch("ifacd_distill.py", run_args(cifar_root, resumed, *crd), nproc=0)
    assert "resumed from" in run.stdout and "at epoch 1" in run.stdout
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

def test_init_stage_resume_is_bit_exact(cifar_root, teacher_ckpt, tmp_path):
    """AB, 2 init epochs + 1 main epoch, straight vs relaunched from the checkpoint after init epoch -2: identical
    student, connectors and both optimizers. The init stage trains the connectors and the student's feature modules
    but not its classifier; it is logged as epochs -2, -1 and never evaluated."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    ab = ["--distill", "abound", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--student", "resnet8x4",
          "--init_epochs", "2", "--epochs", "1"]  # resnet8x4 has twice resnet14's widths: 1x1 conv + BN connectors
    launch("ifacd_distill.py", run_args(cifar_root, straight, *ab, "--save_every", "1"), nproc=0)
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
    run = launch("ifacd_distill.py", run_args(cifar_root, resumed, *ab), nproc=0)
    assert "resumed from" in run.stdout and "at epoch -1" in run.stdout
    a, b = load_ckpt(straight), load_ckpt(resumed)
    for key in ("model", "optimizer", "loss_state", "init_optimizer"):
        assert_same_tensors(a[key], b[key], key)
    assert [r["epoch"] for r in read_log(resumed)] == [-1, 0]


SMOKE = """
import sys
import torch
from common import dist
import ifacd_distill as M
dist.cleanup = lambda: None  # one process group for every run of this process
seen = {}
init_epoch = M.train_init_epoch
def spy(model, teacher, method, *args):  # keep the init stage's modules to compare the ranks later
    seen.update(model=model, state=method.state or torch.nn.Module())
    return init_epoch(model, teacher, method, *args)
M.train_init_epoch = spy
for name, argv in RUNS:
    seen.clear()
    sys.argv = ["ifacd_distill.py", *COMMON, "--output_dir", OUT + "/" + name, *argv]
    M.main()
    if seen:  # trained outside DDP in the init stage: the same weights on both ranks, and the same loss state
        flat = torch.cat([t.detach().flatten().float() for t in [*seen["model"].parameters(),
                          *seen["state"].state_dict().values()]])
        both = dist.gather(flat[None])
        assert torch.equal(both[0], both[1]), name + ": the ranks differ after the init stage"
    if dist.rank() == 0:
        print("done", name, flush=True)
"""


def test_each_repdistiller_method_on_two_ranks(cifar_root, teacher_ckpt, tmp_path):
    """Every method added for RepDistiller's benchmark on a cross-family pair (the resnet14 teacher -> MobileNetV2,
    ShuffleV1 or wrn_16_1), 2 ranks, 1 init epoch (AB, FT, FSP) + 1 main epoch: all in one torchrun, the group kept
    between runs. FSP and KDSVD need equal channel counts per stage (RepDistiller refuses or crashes on other
    pairs): wrn_16_1's are resnet14's."""
    runs = {"abound": ["--distill", "abound", "--student", "ShuffleV1"],
            "factor": ["--distill", "factor", "--student", "MobileNetV2"],
            "fsp": ["--distill", "fsp", "--student", "wrn_16_1"],
            "kdsvd": ["--distill", "kdsvd", "--student", "wrn_16_1"],
            "crd_relax": ["--distill", "crd", "--crd_mode", "relax", "--crd_negatives", "16", "--student", "wrn_16_1"]}
    common = run_args(cifar_root, "unused", "--teacher", "resnet14", "--teacher_ckpt", teacher_ckpt, "--epochs", "1",
                      "--init_epochs", "1")
    common = common[:common.index("--output_dir")] + common[common.index("--output_dir") + 2:]
    script = tmp_path / "smoke.py"
    script.write_text(f"RUNS = {list(runs.items())!r}\nCOMMON = {common!r}\nOUT = {str(tmp_path)!r}\n" + SMOKE)
    out = launch(str(script), [], nproc=2)
    assert out.stdout.count("done") == len(runs), out.stdout[-3000:]
    for name in runs:
        rows = read_log(str(tmp_path / name))
        two_stage = name in ("abound", "factor", "fsp")
        assert [r["epoch"] for r in rows] == ([-1, 0] if two_stage else [0]), name
        assert all(math.isfinite(r["loss"]) for r in rows) and 0 <= rows[-1]["test_top1"] <= 100, name
        assert (rows[-1]["distill"] > 0) == (name in ("factor", "kdsvd", "crd_relax")), (name, rows[-1])
        blob = load_ckpt(str(tmp_path / name))
        assert blob["epoch"] == 1 and ("init_optimizer" in blob) == two_stage, name


BANK_CHECK = """
import torch, torch.nn.functional as F
from common import dist
import distill_losses
ctx = dist.setup("cpu")
torch.manual_seed(0)
memory = distill_losses.CRDMemory(20, 4, 0.5)
torch.manual_seed(1 + ctx.rank)  # each rank its own batch
v_s, v_t = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
idx, neg = torch.arange(3) + 3 * ctx.rank, torch.randint(0, 20, (3, 5))
distill_losses.crd_loss(v_s, v_t, memory, torch.cat([idx[:, None], neg], dim=1), 0.07)
memory.update(dist.gather(v_s), dist.gather(v_t), dist.gather(idx))
state = dist.gather(torch.cat([memory.bank_s.flatten(), memory.bank_t.flatten(), memory.z])[None])
assert torch.equal(state[0], state[1]), "the ranks' CRD banks or Z differ"
unit_rows = int((memory.bank_s.norm(dim=1) - 1).abs().lt(1e-6).sum())  # the updated rows are re-normalised
import sys
sys.stdout.write(f"banks equal {ctx.rank} {unit_rows}\\n")  # one write per rank: the two ranks' lines cannot interleave
sys.stdout.flush()
dist.cleanup()
"""


def test_crd_banks_and_z_stay_equal_across_ranks(tmp_path):
    """Every rank updates its banks with the whole global batch and fixes Z with the mean over ranks."""
    script = tmp_path / "bank_check.py"
    script.write_text(BANK_CHECK)
    out = launch(str(script), [], nproc=2)
    assert out.stdout.count("banks equal") == 2 and "banks equal 0 6" in out.stdout  # 2 ranks x 3 rows renormalised


@pytest.mark.parametrize("extra, message", [
    (["--student", "resnet19"], "student='resnet19' is not one of"),
    (["--distill", "kd"], "--distill kd needs --teacher_ckpt"),
    (["--distill", "kd", "--teacher_ckpt", "MISSING"], "does not exist"),
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
    paths = {"TEACHER": teacher_ckpt, "BARE": bare, "MISSING": str(tmp_path / "nope.pt")}
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


# ------------------------------------------------ the table runner ------------------------------------------------

def run_table(*argv):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_table.py"), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_run_table_dry_run_and_summary(tmp_path):
    root = str(tmp_path / "table")
    argv = ["--methods", "student", "ifacd2", "--pairs", "resnet56-resnet20", "resnet110-resnet20",
            "--seeds", "0", "1", "--out_root", root]
    printed = run_table("ifacd", *argv, "--dry_run", "--", "--epochs", "1").splitlines()
    commands = [line for line in printed if "ifacd_distill.py" in line]
    assert len(commands) == 2 + 2 + 4  # two teachers once, resnet20 vanilla x 2 seeds, 2 pairs x 2 seeds
    assert sum("vanilla_resnet56.yaml" in c for c in commands) == 1 and all(c.endswith("--epochs 1") for c in commands)
    assert "--teacher_ckpt " + os.path.join(root, "vanilla_resnet56", "last.pt") in commands[-4]
    assert not os.path.exists(root)  # a dry run writes nothing
    # Finished runs are skipped and summarised: fake them (a complete last.pt and a log.jsonl each).
    accs = {"vanilla_resnet56": [72.0], "vanilla_resnet110": [74.0], "vanilla_resnet20/seed0": [69.0],
            "vanilla_resnet20/seed1": [70.0], "resnet56-resnet20_ifacd2/seed0": [71.0],
            "resnet56-resnet20_ifacd2/seed1": [72.0], "resnet110-resnet20_ifacd2/seed0": [70.5],
            "resnet110-resnet20_ifacd2/seed1": [71.5]}
    for run, (acc,) in accs.items():
        os.makedirs(os.path.join(root, run))
        M.checkpoint.save(os.path.join(root, run, "last.pt"), 1, 2, {"epochs": 1})
        M.log.append_jsonl(os.path.join(root, run, "log.jsonl"), {"epoch": 0, "test_top1": acc, "best_test_top1": acc})
    out = run_table("ifacd", *argv)
    assert "ifacd_distill.py" not in out and out.count("# done") == 8
    table = open(os.path.join(root, "results.md")).read()
    assert ("| ifacd2 | 71.50 ± 0.71 (n=2) [slides 71.7] | 71.00 ± 0.71 (n=2) [slides 71.57] "
            "| 71.25 [slides 71.63] |") in table
    assert "| student | 69.50 ± 0.71 (n=2) [slides 69] | 69.50 ± 0.71 (n=2) [slides 69] |" in table
    assert "| teacher | 72.00 ± 0.00 (n=1) [slides 72.79] |" in table
    assert len(open(os.path.join(root, "results.csv")).read().splitlines()) == 1 + 8


TABLE_ROWS = ["kd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "nst", "crd", "ifacd1",
              "ifacd2", "ifacd3"]
REPDISTILLER_B = {"crd": 0.8, "hint": 100, "attention": 1000, "similarity": 3000, "correlation": 0.02, "vid": 1,
                  "rkd": 1, "pkt": 30000, "nst": 50}  # RepDistiller scripts/run_cifar_distill.sh -b (section 9)


def test_every_cell_of_the_table_has_a_config():
    """Six pairs x 13 method rows: each YAML parses, names its pair and method, keeps S000's alpha = beta = 1, and
    weighs the RepDistiller methods with RepDistiller's b."""
    for pair in PAIRS:
        t_name, s_name = pair.split("-")
        for row in TABLE_ROWS:
            cfg = cfg_of("--config", os.path.join(ROOT, "configs", "ifacd_distill", f"{pair}_{row}.yaml"))
            method = "ifacd" if row.startswith("ifacd") else row
            assert (cfg.teacher, cfg.student, cfg.distill) == (t_name, s_name, method), (pair, row)
            assert cfg.alpha == cfg.beta == 1 and cfg.output_dir.endswith(f"{pair}_{row}")
            assert cfg.teacher_ckpt == f"out/ifacd_distill/vanilla_{t_name}/last.pt"
            if method in REPDISTILLER_B:
                assert cfg.gamma == REPDISTILLER_B[method], (pair, row)
            if method == "ifacd":
                assert cfg.ifacd_layers == int(row[-1])


def test_run_table_defaults_to_the_whole_table(tmp_path):
    commands = [c for c in run_table("ifacd", "--seeds", "0", "--out_root", str(tmp_path), "--dry_run").splitlines()
                if "ifacd_distill.py" in c]
    # 5 teachers, 5 vanilla students (resnet20 serves two pairs), 13 rows x 6 pairs
    assert len(commands) == 5 + 5 + 13 * 6
    unnamed = run_table("--seeds", "0", "--out_root", str(tmp_path), "--dry_run")  # before tables had names
    assert [c for c in unnamed.splitlines() if "ifacd_distill.py" in c] == commands
    for row in TABLE_ROWS:
        assert sum(f"_{row}.yaml" in c for c in commands) == 6, row


def test_crd_memory_update_keeps_momentum_on_the_bank():
    """RepDistiller's ContrastMemory: bank[idx] <- normalise(m * bank[idx] + (1 - m) * v), other rows untouched.
    At m = 0.9 (not the default 0.5, where swapping m and 1 - m changes nothing)."""
    torch.manual_seed(0)
    memory = distill_losses.CRDMemory(6, 4, momentum=0.9)
    bank_s, bank_t = memory.bank_s.clone(), memory.bank_t.clone()
    v_s, v_t = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    idx = torch.tensor([1, 4])
    memory.update(v_s, v_t, idx)
    for bank, before, v in ((memory.bank_s, bank_s, v_s), (memory.bank_t, bank_t, v_t)):
        torch.testing.assert_close(bank[idx], F.normalize(0.9 * before[idx] + 0.1 * v, dim=1))
        keep = torch.tensor([0, 2, 3, 5])
        assert torch.equal(bank[keep], before[keep])
