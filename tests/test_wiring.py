"""Each script's main() wired as its paper says, run in-process for a few steps with spies on the
shared calls and on the script's own loss functions. One run per script (the `wired` fixture, with
every weight, temperature and momentum off its default, so that a value replaced by its default
constant fails) feeds every check:
- schedules: the lr of every step against the hand-computed schedule (warmup from 0; per step,
  or per epoch for SimSiam, whose predictor keeps its lr, and for RepDistiller's step decay), the
  weight decay, SDSSL's alpha ramp, the EMA momentum, and the teacher against the hand-computed
  mix of the right networks;
- the loss: each loss function gets the config's temperatures, weights and switches, and the
  optimizer steps on the config's weighted sum of the terms those functions returned;
- resume: the run's epoch-1 checkpoint resumed for the second epoch gives the same bits.
Variants (SDSSL's other frameworks, heads and constant alpha; SimSiam without GSG or stop-gradient;
IFACLR's lwclr; IFACD's own loss; the init stage of FT and AB) get runs of their own.

These are the bugs only a run touches: a dropped warmup, a per-step schedule where the paper's is
per epoch, a ramp held at its final value, an EMA with its arguments swapped (pulling the online
network to the target), a weight or temperature replaced by a constant, a state missing from
checkpoint.resume, every rank seeded alike.
"""
import dataclasses
import inspect
import math
import pytest
import torch
import torch.nn.functional as F

import byol
import distill_losses
import ifacd_distill
import ifaclr
import mocov3
import msbreg
import sdssl
import simclr
import simsiam_gsg
from common import config, dist, optim
from common.cifar_models import build_cifar_model
from helpers import TINY, assert_same_tensors, copy_epoch_1, load_ckpt, read_log, run_script

MODULES = {m.__name__: m for m in (simclr, mocov3, byol, simsiam_gsg, sdssl, msbreg, ifacd_distill,
                                   ifaclr)}
VIT = ["--arch", "vit_debug", "--patch_size", "8", "--num_heads", "2"]  # 2 blocks
VIT_MINI = ["--arch", "vit_mini", "--patch_size", "8", "--num_heads", "2"]  # 6 blocks
RESNET = ["--arch", "resnet8"]
FLAGS = {  # 2 epochs of 2 steps at global batch 8, 1 warmup epoch (steps 0, 1 warm up; 2, 3 decay)
    "simclr": RESNET + ["--temperature", "0.3"],
    "mocov3": RESNET + ["--pred_hidden_dim", "64", "--temperature", "0.4",
                        "--base_momentum", "0.95"],
    "byol": RESNET + ["--pred_hidden_dim", "64", "--base_momentum", "0.97"],
    "simsiam_gsg": RESNET + ["--base", "byol", "--pred_hidden_dim", "16", "--proj_layers", "2",
                             "--ema_momentum", "0.95"],
    "sdssl": VIT + ["--isd_hidden_dim", "32", "--pred_hidden_dim", "64", "--alpha_max", "0.7",
                    "--beta", "0.6", "--temperature", "0.3", "--base_momentum", "0.98"],
    "msbreg": RESNET + ["--num_views", "2", "--lambda_s", "0.01", "--lambda_b", "0.3",
                        "--centroid", "others", "--target_decay", "0.97"],
    "ifaclr": VIT + ["--method", "simlwclr", "--temperature", "0.3", "--clip_grad_norm", "0.5"],
    # CRD: its weights, and its memory banks carried across the resume; lr x 0.1 after epoch 1
    "ifacd_distill": ["--distill", "crd", "--teacher", "resnet8", "--student", "resnet8",
                      "--crd_negatives", "16", "--crd_momentum", "0.9", "--lr_milestones", "1",
                      "--alpha", "0.7", "--beta", "0.6", "--gamma", "0.5", "--kd_temperature", "3",
                      "--nce_temperature", "0.1"],
}
OFF_DEFAULT = {  # the fields FLAGS moves off their defaults (checked: the checks keep their teeth)
    "simclr": ["temperature"], "mocov3": ["temperature", "base_momentum"],
    "byol": ["base_momentum"], "simsiam_gsg": ["ema_momentum"],
    "sdssl": ["alpha_max", "beta", "temperature", "base_momentum"],
    "msbreg": ["num_views", "lambda_s", "lambda_b", "centroid", "target_decay"],
    "ifaclr": ["temperature", "clip_grad_norm"],
    "ifacd_distill": ["alpha", "beta", "gamma", "kd_temperature", "nce_temperature",
                      "crd_negatives", "crd_momentum", "lr_milestones"]}
ALL_STEPS = ["--epochs", "2", "--warmup_epochs", "1", "--eval_every", "0", "--save_every", "1",
             "--weight_decay", "0.03"]
RECORDED = {  # the loss functions each script's step calls: recorded, bound arguments and result
    "simclr": [(simclr, "simclr_loss")], "mocov3": [(mocov3, "mocov3_loss")],
    "byol": [(byol, "byol_loss")],
    "simsiam_gsg": [(simsiam_gsg, "gsg_loss"), (simsiam_gsg, "simsiam_loss")],
    "sdssl": [(sdssl, f) for f in ("sdssl_loss", "contrastive_loss", "regression_loss",
                                   "nt_xent_loss")],
    "msbreg": [(msbreg, "msbreg_loss")],
    "ifaclr": [(ifaclr, "ifaclr_objective"), (ifaclr, "ifaclr_loss")],
    "ifacd_distill": [(ifacd_distill, "kd_loss"), (ifacd_distill, "ifacd_loss"),
                      (distill_losses, "crd_loss")]}


def argv(name, data_dir, out, *extra):
    if name == "ifacd_distill":
        return ["--dataset", "fake", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
                "--epochs", "2", "--max_steps_per_epoch", "2", "--log_every", "1", "--output_dir",
                out, "--save_every", "1", "--weight_decay", "0.03", *extra]
    return ["--config", TINY, "--data_dir", data_dir, "--output_dir", out, *ALL_STEPS, *extra]


def run_main(name, args):
    """The script's main() in this process, in the session's 1-process group; its Config."""
    run_script(name, args)
    return config.parse(MODULES[name].Config, args)


def cosine_with_warmup(step, peak, warmup=2, total=4):  # by hand: linear from 0, then cosine to 0
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def ema_momentum(t, m0, total=4):  # BYOL / MoCo v3: 1 - (1 - m0)(1 + cos(pi t / T)) / 2
    return 1 - (1 - m0) * (1 + math.cos(math.pi * t / total)) / 2


def close(values):
    return pytest.approx(values, rel=1e-6, abs=1e-7)


def val(t):
    return float(t.detach())


@dataclasses.dataclass
class Call:
    args: dict  # the bound arguments, defaults applied
    out: object
    extra: dict  # what a hook measured before the call


class Wired:
    """One in-process run of a script's main() with spies: `steps` (per optimizer step: the loss
    stepped on, the optimizer, each group's lr and weight decay, the clip norm), `emas` (each EMA
    update's momentum; the update is checked against the hand-computed mix as it happens),
    `calls[function]` (the script's loss functions, RECORDED) and `model` (what dist.prepare got).
    The spies only read, so the run is the one an unspied main() makes, bit for bit."""

    def __init__(self, name, args, mp):
        self.name, self.args, self.module = name, args, MODULES[name]
        self.cfg = config.parse(self.module.Config, args)
        self.steps, self.emas, self.calls, self.optimizer, self.model = [], [], {}, None, None
        self.spy_shared(mp)
        for owner, function in RECORDED[name]:
            self.record(mp, owner, function)
        if name == "ifacd_distill":
            mp.setattr(ifacd_distill, "F", RecordedFunctional(self.calls))
            self.check_crd_bank_update(mp)
        run_main(name, args)

    def spy_shared(self, mp):
        real_step, real_prepare = optim.step, dist.prepare

        def step(loss, optimizer, scaler, *args, **kwargs):
            self.optimizer = optimizer
            groups = optimizer.param_groups
            self.steps.append(dict(loss=val(loss), optimizer=optimizer,
                                   clip=args[0] if args else kwargs.get("clip_grad_norm", 0.0),
                                   lr={g["name"]: g["lr"] for g in groups},
                                   wd={g["name"]: g["weight_decay"] for g in groups}))
            return real_step(loss, optimizer, scaler, *args, **kwargs)

        def prepare(model, *args, **kwargs):
            self.model = model
            return real_prepare(model, *args, **kwargs)
        mp.setattr(optim, "step", step)
        mp.setattr(dist, "prepare", prepare)
        if hasattr(self.module, "ema_update"):
            mp.setattr(self.module, "ema_update", self.checked_ema(self.module.ema_update))

    def checked_ema(self, real_ema):
        def ema(target, online, m):
            assert not any(p.requires_grad for p in target.parameters()), \
                "the first argument must be the target"
            if self.optimizer is not None:  # GSG's first update comes before the first step
                trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
                assert any(id(p) in trained for p in online.parameters()), \
                    "the second must be the trained network"
            before = {k: v.detach().clone().double() for k, v in target.named_parameters()}
            theta = {k: v.detach().clone().double() for k, v in online.named_parameters()}
            real_ema(target, online, m)
            for k, v in target.named_parameters():
                torch.testing.assert_close(v.double(), m * before[k] + (1 - m) * theta[k], rtol=0,
                                           atol=1e-6)
            self.emas.append(m)
        return ema

    def record(self, mp, owner, function):
        real = getattr(owner, function)
        signature, hook = inspect.signature(real), HOOKS.get(function)

        def spy(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            extra = hook(self, bound.arguments) if hook else {}  # the graph is still whole
            out = real(*args, **kwargs)
            self.calls.setdefault(function, []).append(Call(dict(bound.arguments), out, extra))
            return out
        mp.setattr(owner, function, spy)

    def check_crd_bank_update(self, mp):
        """CRDMemory.update: bank[idx] <- normalise(m bank[idx] + (1 - m) v), m = crd_momentum."""
        real, m = distill_losses.CRDMemory.update, self.cfg.crd_momentum

        def update(memory, v_s, v_t, idx):
            before = [memory.bank_s[idx].clone(), memory.bank_t[idx].clone()]
            real(memory, v_s, v_t, idx)
            for bank, old, v in zip((memory.bank_s, memory.bank_t), before, (v_s, v_t)):
                torch.testing.assert_close(bank[idx], F.normalize(old * m + v * (1 - m), dim=1))
            self.calls.setdefault("crd_update", []).append(Call({}, None, {}))
        mp.setattr(distill_losses.CRDMemory, "update", update)

    def losses(self):
        return [s["loss"] for s in self.steps]

    def lrs(self, group="decay"):
        return [s["lr"][group] for s in self.steps]


class RecordedFunctional:
    """ifacd_distill's `F` with cross_entropy recorded (the CE term has no function of its own)."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, *args, **kwargs):
        out = F.cross_entropy(*args, **kwargs)
        self.calls.setdefault("cross_entropy", []).append(Call({}, out, {}))
        return out


def intermediate_reaches_backbone(wired, arguments):
    """IFACLR: does the output of the first of the N layers (an intermediate block's) carry a
    gradient into the backbone? Not with --detach_layers true."""
    z = arguments["z"]  # (views * n, N, D)
    params = [p for p in wired.model.backbone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(z[:, 0].sum(), params, retain_graph=True, allow_unused=True)
    return {"reaches": any(g is not None and bool(g.abs().sum() > 0) for g in grads)}


HOOKS = {"ifaclr_objective": intermediate_reaches_backbone}


def wire(name, out, monkeypatch, *flags, data_dir=""):
    """A variant run of `name` with its own flags, spied."""
    return Wired(name, argv(name, data_dir, str(out), *flags), monkeypatch)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """An untrained resnet8 for the fake set's 10 classes, a bare state dict (load_teacher takes
    one): the wiring needs a teacher, not a good one."""
    path = str(tmp_path_factory.mktemp("teacher") / "resnet8.pt")
    torch.save(build_cifar_model("resnet8", 10).state_dict(), path)
    return path


@pytest.fixture(scope="module", params=sorted(MODULES))
def wired(request, process_group, image_folder, tmp_path_factory, teacher_ckpt):
    """Each script's run with FLAGS, spied (see Wired); its checkpoints stay in `wired.out`."""
    name = request.param
    out = str(tmp_path_factory.mktemp(name))
    extra = FLAGS[name] + (["--teacher_ckpt", teacher_ckpt] if name == "ifacd_distill" else [])
    with pytest.MonkeyPatch.context() as mp:
        w = Wired(name, argv(name, image_folder, out, *extra), mp)
    w.out, w.extra = out, extra
    return w


# ----- schedules: lr, weight decay, loss weights, EMA momentum, step by step -----

def test_flags_move_the_checked_values_off_their_defaults(wired):
    defaults = config.parse(wired.module.Config, [])
    for field in OFF_DEFAULT[wired.name] + ["weight_decay"]:
        assert getattr(wired.cfg, field) != getattr(defaults, field), field


def test_lr_and_loss_weights_follow_their_schedules(wired):
    """The lr of every step (set per epoch by SimSiam and RepDistiller), and SDSSL's alpha:
    cosine_scheduler(0, alpha_max) per iteration (Sec. 4.1; beta is constant: its weight is checked
    by test_weights_and_switches_reach_the_loss)."""
    name, cfg = wired.name, wired.cfg
    assert len(wired.steps) == 4
    if name == "sdssl":
        alphas = [c.args["alpha"] for c in wired.calls["sdssl_loss"]]
        assert alphas == close([cfg.alpha_max * (1 - math.cos(math.pi * s / 4)) / 2
                                for s in range(4)])
    if name == "ifacd_distill":  # x lr_decay from each milestone epoch on; the fork's 0.2 x B / 256
        peak = cfg.lr * 8 / 64
        assert wired.lrs() == close([peak, peak, peak * cfg.lr_decay, peak * cfg.lr_decay])
        return
    peak = cfg.lr * 8 / 256 * (cfg.num_views if name == "msbreg" else 1)  # each paper's rule
    if name == "simsiam_gsg":  # per epoch: the warmup epoch 0 at 0, then the cosine's start
        assert wired.lrs() == close([0.0, 0.0, peak, peak])
        assert wired.lrs("predictor_decay") == close([peak] * 4)  # --fix-pred-lr
    else:
        assert wired.lrs() == close([cosine_with_warmup(s, peak) for s in range(4)])
    if name == "ifaclr":  # the prototype clips the global gradient norm
        assert [s["clip"] for s in wired.steps] == [cfg.clip_grad_norm] * 4


def test_weight_decay_is_constant_and_the_configs(wired):
    """No script schedules the weight decay: the decaying groups keep --weight_decay at every step,
    and biases and norms get a group without it exactly when exclude_bias_norm is on."""
    cfg = wired.cfg
    exclude = True if wired.name == "msbreg" else cfg.exclude_bias_norm  # MSBReg: always (7.1)
    for s in wired.steps:
        assert any(g.endswith("no_decay") for g in s["wd"]) == exclude
        assert all(wd == (0.0 if g.endswith("no_decay") else cfg.weight_decay)
                   for g, wd in s["wd"].items())


def test_ema_momentum_follows_the_schedule(wired):
    name, cfg = wired.name, wired.cfg
    expected = {  # MoCo v3: m(t + 1) after step t (its docstring); BYOL: the tau of the step taken
        "mocov3": lambda: [ema_momentum(s + 1, cfg.base_momentum) for s in range(4)],
        "byol": lambda: [ema_momentum(s, cfg.base_momentum) for s in range(4)],
        "sdssl": lambda: [ema_momentum(s, cfg.base_momentum) for s in range(4)],
        "msbreg": lambda: [ema_momentum(s, cfg.target_decay) for s in range(4)],
        "simsiam_gsg": lambda: [cfg.ema_momentum] * 4,  # gsg/builder.py: constant, before forward
    }.get(name, lambda: [])()
    assert wired.emas == close(expected)
    # the collapse monitors in every epoch's row: common.log.output_std in (0 collapsed, 1], and
    # output_spectrum's top-1 share in (0, 1] and effective rank in [1, the batch of 8 images]
    if name != "ifacd_distill":
        for row in read_log(wired.out):
            assert 0 < row["out_std"] <= 1 and 0 < row["out_top1"] <= 1, row
            assert 1 <= row["out_rank"] <= 2 * 8, row  # SimCLR's z holds both views


# ----- what each script passes into its loss -----

def check_simclr(w):
    calls = w.calls["simclr_loss"]
    assert [c.args["temperature"] for c in calls] == [w.cfg.temperature] * len(w.steps)
    factor = 2.0 if w.cfg.sum_directions else 1.0  # the TF code's loss_a + loss_b, or the mean
    assert w.losses() == close([factor * val(c.out) for c in calls])


def check_two_directions(w, function, temperature=None):
    """MoCo v3, BYOL: the step is on the sum of the two directions' losses, at the config's tau."""
    calls = w.calls[function]
    assert len(calls) == 2 * len(w.steps)
    if temperature is not None:
        assert {c.args["temperature"] for c in calls} == {temperature}
    pairs = zip(calls[::2], calls[1::2])
    assert w.losses() == close([val(a.out) + val(b.out) for a, b in pairs])


def check_simsiam_gsg(w):
    gsg, plain = w.calls.get("gsg_loss", []), w.calls.get("simsiam_loss", [])
    if w.cfg.gsg:
        assert len(gsg) == len(w.steps) and not plain
        assert w.losses() == close([val(c.out) for c in gsg])
    else:
        assert not gsg and len(plain) == 2 * len(w.steps)
        assert {c.args["stop_grad"] for c in plain} == {w.cfg.stop_grad}
        pairs = zip(plain[::2], plain[1::2])
        assert w.losses() == close([0.5 * (val(a.out) + val(b.out)) for a, b in pairs])


def check_sdssl(w, layers=(1,)):
    cfg, calls = w.cfg, w.calls["sdssl_loss"]
    assert len(calls) == len(w.steps) and w.model.layers == list(layers)
    has_pred = cfg.pred_loss and cfg.framework != "simclr"
    for c, stepped in zip(calls, w.losses()):
        total, terms = c.out
        assert c.args["cfg"] == cfg
        assert set(terms) == {"ssl", "isd"} | ({"pred"} if has_pred else set())
        h, q, _ = c.args["student_out"][0]
        assert (h if q is None else q).shape[0] == len(layers) + 1  # K outputs per view
        by_hand = (terms["ssl"] + c.args["alpha"] * terms["isd"]  # Eq. 6
                   + cfg.beta * terms.get("pred", 0.0))
        assert val(total) == close(val(by_hand)) and stepped == close(val(total))
    used = {"mocov3": "contrastive_loss", "simclr": "nt_xent_loss",
            "byol": "regression_loss"}[cfg.framework]
    assert set(w.calls) == {"sdssl_loss", used}
    if used != "regression_loss":
        assert {c.args["temperature"] for c in w.calls[used]} == {cfg.temperature}


def check_msbreg(w):
    cfg, calls = w.cfg, w.calls["msbreg_loss"]
    assert len(calls) == len(w.steps)
    for c, stepped in zip(calls, w.losses()):
        a = c.args
        assert (a["lambda_s"], a["lambda_b"], a["centroid"]) == (cfg.lambda_s, cfg.lambda_b,
                                                                 cfg.centroid)
        assert a["p"].shape[0] == a["z"].shape[0] == a["n"].shape[0] == cfg.num_views
        total, parts = c.out
        by_hand = (parts["loss_c"] + cfg.lambda_s * parts["loss_s"]  # Eq. 2
                   + cfg.lambda_b * parts["loss_b"])
        assert val(total) == close(val(by_hand)) and stepped == close(val(total))
        l_c = (msbreg.cross_view_loss(a["p"], a["z"]) if cfg.centroid == "none" else
               msbreg.centroid_loss(a["p"], a["z"], leave_one_out=cfg.centroid == "others"))
        assert val(parts["loss_c"]) == close(val(l_c))


def check_ifaclr(w):
    cfg, objectives, losses = w.cfg, w.calls["ifaclr_objective"], w.calls["ifaclr_loss"]
    views = 1 if cfg.method == "lwclr" else 2
    assert len(objectives) == len(w.steps) and len(losses) == views * len(w.steps)
    assert {c.args["temperature"] for c in losses} == {cfg.temperature}
    # lwclr: the N layers of the view; simlwclr: one view's last layer + the other view's N
    assert {c.args["z"].shape[1] for c in losses} == {cfg.layers if views == 1 else 1 + cfg.layers}
    for c in objectives:
        assert c.args["cfg"] == cfg and tuple(c.args["z"].shape[:2]) == (views * 8, cfg.layers)
        assert c.extra["reaches"] == (not cfg.detach_layers)
    per_step = [sum(val(c.out) for c in losses[i:i + views]) / views
                for i in range(0, len(losses), views)]
    assert [val(c.out) for c in objectives] == close(per_step)
    assert w.losses() == close(per_step)


def check_distill(w):
    """S000: L = alpha CE + beta KL(T) + gamma L_method, at the config's weights and taus."""
    cfg = w.cfg
    ce, kl = [val(c.out) for c in w.calls["cross_entropy"]], w.calls["kd_loss"]
    assert {c.args["temperature"] for c in kl} == {cfg.kd_temperature}
    if cfg.distill == "crd":
        term = w.calls["crd_loss"]
        assert {c.args["sample"].shape[1] for c in term} == {1 + cfg.crd_negatives}
        assert {c.args["memory"].momentum for c in term} == {cfg.crd_momentum}
        assert len(w.calls["crd_update"]) == len(w.steps)  # each checked as it ran
    else:
        term = w.calls["ifacd_loss"]  # the student's view, then the teacher's last n layers
        assert {c.args["features"].shape[1] for c in term} == {1 + cfg.ifacd_layers}
    assert {c.args["temperature"] for c in term} == {cfg.nce_temperature}
    assert len(ce) == len(kl) == len(term) == len(w.steps)
    by_hand = [cfg.alpha * a + cfg.beta * val(b.out) + cfg.gamma * val(c.out)
               for a, b, c in zip(ce, kl, term)]
    assert w.losses() == close(by_hand)


CHECKS = {"simclr": check_simclr, "simsiam_gsg": check_simsiam_gsg, "sdssl": check_sdssl,
          "mocov3": lambda w: check_two_directions(w, "mocov3_loss", w.cfg.temperature),
          "byol": lambda w: check_two_directions(w, "byol_loss"), "msbreg": check_msbreg,
          "ifaclr": check_ifaclr, "ifacd_distill": check_distill}


def test_weights_and_switches_reach_the_loss(wired):
    CHECKS[wired.name](wired)


def test_simclr_mean_of_the_directions(process_group, image_folder, tmp_path, monkeypatch):
    """--sum_directions false (SDSSL's ViT baseline: CE over 2N rows): the step is on the mean."""
    w = wire("simclr", tmp_path, monkeypatch, *FLAGS["simclr"], "--epochs", "1",
             "--sum_directions", "false", data_dir=image_folder)
    check_simclr(w)


SDSSL_VARIANTS = {  # flags -> the blocks with intermediate heads
    "simclr_every2_mlp2_constant": (VIT_MINI + [
        "--framework", "simclr", "--isd_every", "2", "--isd_head", "mlp2", "--alpha_schedule",
        "constant", "--alpha_max", "0.7", "--temperature", "0.3", "--isd_hidden_dim", "32"],
        [2, 4]),
    "byol_nopred_none": (VIT + [
        "--framework", "byol", "--pred_loss", "false", "--isd_head", "none", "--alpha_max", "0.7",
        "--beta", "0.6", "--pred_hidden_dim", "64"], [1])}


@pytest.mark.parametrize("variant", sorted(SDSSL_VARIANTS))
def test_sdssl_variants(process_group, image_folder, tmp_path, monkeypatch, variant):
    """The other frameworks, heads on every n-th block only ('MLP/n'), 2-layer or no intermediate
    projectors, no L_pred, a constant alpha: each reaches the model and the loss."""
    flags, layers = SDSSL_VARIANTS[variant]
    w = wire("sdssl", tmp_path, monkeypatch, *flags, data_dir=image_folder)
    check_sdssl(w, layers)
    if w.cfg.alpha_schedule == "constant":
        assert [c.args["alpha"] for c in w.calls["sdssl_loss"]] == [w.cfg.alpha_max] * 4
    projector = w.model.isd_projector
    if w.cfg.isd_head == "none":
        assert [type(m) for m in projector] == [torch.nn.Identity] * len(layers)
    else:
        assert len(projector.weights) == {"mlp2": 2, "mlp3": 3}[w.cfg.isd_head]


def test_simsiam_without_gsg_or_stop_gradient(process_group, image_folder, tmp_path, monkeypatch):
    """SimSiam's Fig. 2 ablation: SimSiam on 2 views, no stop-gradient, no target. Without
    --fix_pred_lr the predictor follows the per-epoch cosine too (no warmup: epoch 0 at the peak,
    epoch 1 at half of it)."""
    w = wire("simsiam_gsg", tmp_path, monkeypatch, *RESNET, "--base", "simsiam", "--gsg", "false",
             "--stop_grad", "false", "--fix_pred_lr", "false", "--warmup_epochs", "0",
             "--pred_hidden_dim", "16", "--proj_layers", "2", data_dir=image_folder)
    check_simsiam_gsg(w)
    peak = w.cfg.lr * 8 / 256
    assert w.lrs() == w.lrs("predictor_decay") == close([peak, peak, peak / 2, peak / 2])
    assert w.emas == []


def test_ifaclr_lwclr_layers_without_detach(process_group, image_folder, tmp_path, monkeypatch):
    """lwclr: one view, the last 3 blocks, the intermediate ones not detached (the wired run:
    simlwclr, 2 blocks, detached)."""
    w = wire("ifaclr", tmp_path, monkeypatch, *VIT_MINI, "--method", "lwclr", "--layers", "3",
             "--detach_layers", "false", "--temperature", "0.3", "--epochs", "1",
             data_dir=image_folder)
    check_ifaclr(w)


def test_ifacd_weights_and_layers(process_group, tmp_path, monkeypatch, teacher_ckpt):
    w = wire("ifacd_distill", tmp_path, monkeypatch, "--distill", "ifacd", "--teacher", "resnet8",
             "--student", "resnet8", "--teacher_ckpt", teacher_ckpt, "--ifacd_layers", "1",
             "--alpha", "0.7", "--beta", "0.6", "--gamma", "0.5", "--kd_temperature", "3",
             "--nce_temperature", "0.1", "--epochs", "1")
    check_distill(w)


@pytest.mark.parametrize("method, init_lr", [("factor", lambda cfg: 0.01),
                                             ("abound", lambda cfg: cfg.lr)])
def test_init_stage_lr(process_group, tmp_path, monkeypatch, teacher_ckpt, method, init_lr):
    """AB, FT, FSP: RepDistiller's init stage (helper/pretrain.py), on an optimizer of its own at a
    constant lr of its own (FT: 0.01 for ResNet students; AB, FSP: the main lr), scaled with the
    batch as the main lr is; then the main loop at the main lr."""
    w = wire("ifacd_distill", tmp_path, monkeypatch, "--distill", method, "--teacher", "resnet8",
             "--student", "resnet8", "--teacher_ckpt", teacher_ckpt, "--init_epochs", "1",
             "--epochs", "1", "--lr", "0.04")
    assert len(w.steps) == 4
    init, main = w.steps[:2], w.steps[2:]
    assert init[0]["optimizer"] is init[1]["optimizer"]
    assert main[0]["optimizer"] is main[1]["optimizer"] is not init[0]["optimizer"]
    init_lrs = [lr for s in init for lr in s["lr"].values()]
    assert init_lrs == close([init_lr(w.cfg) * 8 / 64] * len(init_lrs))
    assert w.lrs()[2:] == close([w.cfg.lr * 8 / 64] * 2)


# ----- resume: every state the checkpoint holds, for every script -----

def test_resume_is_bit_exact(wired, image_folder, tmp_path):
    """The wired run's 2 epochs vs its epoch-1 checkpoint resumed for the second: every tensor of
    every state (model, teacher, optimizer, scaler, loss_state) and the step count are identical. A
    state left out of the script's checkpoint.resume call (a fresh teacher, optimizer or CRD bank)
    fails here."""
    name, straight, resumed = wired.name, wired.out, str(tmp_path / "resumed")
    copy_epoch_1(straight, resumed)
    run_main(name, argv(name, image_folder, resumed, *wired.extra))
    a, b = load_ckpt(straight), load_ckpt(resumed)
    states = [k for k in a if isinstance(a[k], dict) and k != "config"]
    assert {"model", "optimizer", "scaler"} <= set(states)
    assert ("teacher" in states) == (name in ("mocov3", "byol", "sdssl", "msbreg", "simsiam_gsg"))
    assert ("loss_state" in states) == (name == "ifacd_distill")  # CRD's banks
    for key in states:
        assert_same_tensors(a[key], b[key], key)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    first = load_ckpt(straight, "epoch_0001.pt")
    assert any(not torch.equal(a["model"][k], first["model"][k]) for k in a["model"])  # trained


# ----- per-rank seeding -----

@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_script_seeds_each_epoch_per_rank(name):
    """CONVENTIONS 10: seed + 1000 * epoch + rank at the start of every epoch (tests/test_dist.py:
    two ranks draw different views; tests/common/test_data.py: the order); every script passes its rank."""
    assert "data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)" in inspect.getsource(
        MODULES[name].main)


def test_output_std_is_the_collapse_monitor():
    """1/sqrt(D) for outputs spread evenly over the sphere's axes, 0 when every output is the same
    vector."""
    from common.log import output_std
    d = 64
    spread = torch.eye(d).repeat(50, 1) * torch.randn(50 * d, 1).sign()  # (3200, D): +-e_i
    assert float(output_std(spread)) == pytest.approx(d ** -0.5, rel=0.02)
    assert float(output_std(torch.randn(1, d).repeat(100, 1))) == 0.0
    assert float(output_std(torch.stack([spread, spread]))) == pytest.approx(
        float(output_std(spread)))
