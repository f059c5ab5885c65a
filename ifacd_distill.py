"""IFACD: Intermediate Features Augmented Contrastive Distillation (Rios et al., slides S000),
with KD, CRD (Tian et al. 2020, arXiv:1910.10699) and the rest of RepDistiller's CIFAR-100 methods.

A frozen teacher supervises the student through (S000 "Methodology")
    L = alpha * CE(student, y) + beta * KL(teacher || student, T) + gamma * L_method
L_method: 0 for kd, `ifacd_loss` for ifacd, a section of distill_losses.py for crd and the others.
Reproduces (top-1 of the last epoch; configs in configs/ifacd_distill/)
- the S000 table, six pairs x every method: scripts/run_table.py ifacd
- its recipe, the authors' RepDistiller fork: --nesterov, --exclude_bias_norm, `peak_lr` in main
- its parameter, memory and time tables: `param_counts`, `peak_reserved` and `train_time` in main
- RepDistiller's README tables with its own recipe: scripts/run_table.py repdistiller
Known deviations
- gamma is not in S000: --gamma
- BN statistics are per GPU: --sync_bn
- CRD's negatives come from torch's RNG: distill_losses.DistillSet
- the init stage of AB, FT and FSP runs outside DDP: `train_init_epoch`
Run
    python ifacd_distill.py --config configs/ifacd_distill/vanilla_wrn_40_2.yaml          # teacher
    python ifacd_distill.py --config configs/ifacd_distill/wrn_40_2-wrn_16_2_ifacd2.yaml  # student
    torchrun --standalone --nproc_per_node=4 ifacd_distill.py \
        --config configs/ifacd_distill/vgg13-vgg8_crd.yaml                                # 4 GPUs
    python ifacd_distill.py --dataset fake --distill none --student resnet8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                                              # CPU run
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import distill_losses
from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.cifar_models import CIFAR_MODELS, build_cifar_model, feature_shapes
from common.config import ConfigError, arg
from common.log import print0

MEAN_STD = {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # RepDistiller's
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
            "mnist": ((0.1307,) * 3, (0.3081,) * 3)}
NUM_CLASSES = {"cifar100": 100, "cifar10": 10, "fashion_mnist": 10, "mnist": 10, "fake": 10}
METHODS = ("none", "kd", "crd", "ifacd", *distill_losses.METHODS)  # METHOD_CLASSES builds them
HEADS_COUNTED_TWICE = ("crd", "ifacd")  # by the slides' parameter table (`param_counts`)


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = arg("cifar100", "training images (fake = random images for smoke runs)",
                       choices=tuple(NUM_CLASSES))
    data_dir: str = arg("./data", "dataset root (holds cifar-100-python / cifar-10-batches-py)")
    download: bool = arg(True, "download CIFAR through torchvision if missing")
    train_subset: int = arg(0, "train on the first N / C images of each class only; 0 = all")
    # models
    distill: str = arg("ifacd", "none (train alone: teachers), kd, crd, ifacd or a RepDistiller "
                                "baseline", choices=METHODS)
    student: str = arg("wrn_16_2", "the model trained", choices=tuple(CIFAR_MODELS))
    teacher: str = arg("wrn_40_2", "the frozen teacher's architecture (unused with distill none)",
                       choices=tuple(CIFAR_MODELS))
    teacher_ckpt: str = arg("", "the teacher's weights: this script's last.pt or a state dict")
    # loss
    alpha: float = arg(1.0, "weight of the cross-entropy (S000: 1)")
    beta: float = arg(1.0, "weight of KL(teacher || student) at kd_temperature (S000: 1)")
    gamma: float = arg(0.8, "weight of L_method; the configs use RepDistiller's (crd 0.8, hint "
                            "100, attention 1000, similarity 3000, correlation 0.02, vid 1, rkd 1, "
                            "pkt 3e4, nst 50), ifacd 0.8")
    kd_temperature: float = arg(4.0, "KD softmax temperature T (Hinton; RepDistiller: 4)")
    nce_temperature: float = arg(0.07, "tau of CRD's NCE and IFACD's SupCon (fork: nce_t 0.07)")
    feat_dim: int = arg(128, "CRD and CC embedding / IFACD projection width (RepDistiller: 128)")
    ifacd_layers: int = arg(2, "IFACD: teacher layers from the end of its last stage (ifacd1/2/3)")
    crd_negatives: int = arg(16384, "CRD: other-class negatives per anchor (RepDistiller nce_k)")
    crd_momentum: float = arg(0.5, "CRD: memory-bank momentum (RepDistiller nce_m: 0.5)")
    crd_mode: str = arg("exact", "CRD's positive: exact = the image itself, relax = a random image "
                                 "of its class (RepDistiller --mode)", choices=("exact", "relax"))
    init_epochs: int = arg(30, "abound, factor, fsp: epochs of the init stage (RepDistiller: 30)")
    hint_layer: int = arg(2, "FitNet: the stage (0 = stem) regressed (RepDistiller hint_layer: 2)")
    sync_bn: bool = arg(False, "SyncBN across GPUs (the paper trains on one GPU); not on the CPU")
    # optimisation
    lr: float = arg(0.05, "learning rate at batch 64, scaled linearly with batch_size (S000: 0.05)")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(True, "Nesterov momentum (the fork, via timm; RepDistiller: false)")
    weight_decay: float = arg(5e-4, "weight decay (S000: 5e-4)")
    exclude_bias_norm: bool = arg(True, "no weight decay on biases and BN parameters (the fork; "
                                        "RepDistiller: false)")
    lr_milestones: list = arg([150, 180, 210], "epochs after which lr is x lr_decay (S000)")
    lr_decay: float = arg(0.1, "step-decay factor")
    epochs: int = arg(240, "training epochs (S000: 240)")
    batch_size: int = arg(64, "global batch size over all GPUs (S000/RepDistiller: 64)")
    amp: str = arg("none", "mixed precision on CUDA: none (the paper: fp32), bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the student and its distillation head")
    # run
    output_dir: str = arg("./out/ifacd_distill", "where last.pt, log.jsonl and config.yaml go")
    seed: int = arg(0, "random seed (the table averages several)")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = the full epoch")
    eval_every: int = arg(1, "test top-1 every this many epochs (and after the last); 0 = off")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ====================================== method: KD and IFACD ======================================
# Every method is a class built by `build_method` and called by the loop through one interface
# (distill_losses.py's docstring); CRD and the RepDistiller baselines are in distill_losses.py.

def kd_loss(student_logits, teacher_logits, temperature):
    """KD (Hinton et al. 2015, arXiv:1503.02531; RepDistiller `DistillKL`): KL(softmax(t/T) ||
    softmax(s/T)) * T^2, summed over classes, mean over this rank's batch. Logits: (B, C)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


class KD:
    """--distill kd and none: no L_method (KD is the beta * KL term; none has no teacher)."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return torch.zeros((), device=s.logits.device)


def ifacd_loss(features, temperature):
    """IFACD's loss: SupCon 'all' without labels (Khosla et al. 2020, Eq. 2 L_out; the fork's
    SupConLoss, base_temperature = temperature), METHODS.md sections 1 and 8. features: (n, V, D),
    this rank's n images x V views (the student's, then the teacher layers'), L2-normalised here.
    Each vector is an anchor; its positives: the V - 1 other views of its image; its denominator:
    every other vector of the global batch (gathered with gradient). Loss = -mean over anchors of
    the mean log-probability of the positives."""
    n, V, D = features.shape
    z = F.normalize(features, dim=2).reshape(n * V, D)  # (nV, D): row i*V + v = view v of image i
    z_all = dist.gather_with_grad(z)  # (W*nV, D): rank r's rows at [nV*r, nV*(r+1))
    offset = n * V * dist.rank()
    logits = z @ z_all.T / temperature  # (nV, W*nV)
    rows = torch.arange(n * V, device=z.device)
    cols = torch.arange(z_all.shape[0], device=z.device)
    self_mask = cols[None, :] == (rows + offset)[:, None]  # an anchor is not in its own denominator
    positive = (cols[None, :] // V == ((rows + offset) // V)[:, None]) & ~self_mask  # same image
    log_prob = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (V - 1)).mean()


class IFACDHead(nn.Module):
    """IFACD's head (fork 62a53e7, METHODS.md section 8): a rescaler Linear(c_l -> t_dim) + BN1d per
    teacher layer (the last one included); projectors Linear + BN1d to feat_dim, proj_s for the
    student, proj_t shared by the teacher layers. forward -> (B, 1 + n, feat_dim), student first."""

    def __init__(self, s_dim, t_dim, layer_dims, feat_dim):
        super().__init__()
        self.rescalers = nn.ModuleList(nn.Sequential(nn.Linear(c, t_dim), nn.BatchNorm1d(t_dim))
                                       for c in layer_dims)
        self.proj_s = nn.Sequential(nn.Linear(s_dim, feat_dim), nn.BatchNorm1d(feat_dim))
        self.proj_t = nn.Sequential(nn.Linear(t_dim, feat_dim), nn.BatchNorm1d(feat_dim))

    def forward(self, s, t):
        layers = t.last_stage[-len(self.rescalers):]  # the teacher's last n ReLU outputs
        views = [self.proj_s(s.pooled)] + [
            self.proj_t(rescale(F.adaptive_avg_pool2d(f, 1).flatten(1)))
            for rescale, f in zip(self.rescalers, layers)]
        return torch.stack(views, dim=1)  # (B, 1+n, feat_dim)


class IFACD:
    """--distill ifacd: `IFACDHead` on the student's pooled feature and the teacher's last
    --ifacd_layers maps of `Features.last_stage`, then `ifacd_loss`."""
    state = None

    def __init__(self, s, t, cfg, n_data):
        n = len(t.last_stage)
        if not 1 <= cfg.ifacd_layers <= n:
            raise ConfigError(f"ifacd_layers={cfg.ifacd_layers}: {cfg.teacher} has {n} ReLU "
                              f"outputs in its last stage; choose 1..{n}")
        dims = [shape[1] for shape in t.last_stage[-cfg.ifacd_layers:]]
        self.head = IFACDHead(s.pooled[1], t.pooled[1], dims, cfg.feat_dim)
        self.temperature = cfg.nce_temperature

    def loss(self, s, t, z, idx, sample):
        return ifacd_loss(z.float(), self.temperature)


METHOD_CLASSES = {"none": KD, "kd": KD, "crd": distill_losses.CRD, "ifacd": IFACD,
                  **distill_losses.METHODS}


def build_method(cfg, student, teacher, n_data, size=32):
    """cfg.distill's method, sized by a probe forward of both models at the training image size;
    n_data: the number of training images."""
    t = feature_shapes(teacher, size) if teacher is not None else None
    return METHOD_CLASSES[cfg.distill](feature_shapes(student, size), t, cfg, n_data)


class Distiller(nn.Module):
    """What DDP wraps: the student and the method's head. forward(x, t) -> (Features, z), z = the
    head's output on (student features, teacher features), or None without a head."""

    def __init__(self, student, heads=None):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, x, t=None):
        s = self.student(x, features=True)
        return s, (self.heads(s, t) if self.heads is not None else None)


def load_teacher(path, name, num_classes, device, channels_last=False):
    """A frozen teacher: zoo model `name` with the weights of `path` (this script's last.pt, a bare
    state dict or RepDistiller's {'model': state_dict}), strict, in eval mode, without gradients."""
    if not os.path.isfile(path):
        raise ConfigError(f"teacher checkpoint {path} does not exist; train the teacher with "
                          f"`--distill none --student {name}` (scripts/run_table.py ifacd does it)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"teacher checkpoint {path} is unreadable ({type(e).__name__}): it is "
                          f"truncated, corrupt or not a PyTorch checkpoint") from None
    if isinstance(blob, dict) and "format" in blob:  # ours: the student part of `model`
        trained = blob.get("config", {}).get("student")
        if trained != name:
            held = f"a {trained}" if trained else "no ifacd_distill.py model"
            raise ConfigError(f"teacher checkpoint {path} holds {held}, not --teacher {name}")
        epochs = blob["config"]["epochs"]
        if blob["epoch"] < epochs:
            print0(f"warning: the teacher in {path} stopped at epoch {blob['epoch']} of {epochs}")
        blob = {k[len("student."):]: v for k, v in blob["model"].items()
                if k.startswith("student.")}
    elif isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        blob = blob["model"]
    teacher = build_cifar_model(name, num_classes)
    try:
        teacher.load_state_dict(blob)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).splitlines()[0][:200]
        raise ConfigError(f"teacher checkpoint {path} does not fit {name}: {detail}") from None
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return teacher.requires_grad_(False).eval().to(device, memory_format=memory_format)


# ============================================ training ============================================

def train_init_epoch(model, teacher, method, trained, loader, optimizer, scaler, cfg, ctx, epoch,
                     lr):
    """An epoch of RepDistiller's init stage (`helper/pretrain.py`: no CE, no KD, constant lr): the
    student in eval mode except the modules trained, the teacher frozen. The student runs outside
    DDP: the gradients are averaged over ranks by hand, and rank 0's BN statistics copied to every
    rank at the end of the epoch (RepDistiller: one GPU)."""
    model.eval()
    trained.train()
    params = list(trained.parameters())
    meter = log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    for i, (x, *_) in enumerate(progress):
        x = x.to(ctx.device, non_blocking=True)
        with optim.autocast(cfg.amp, ctx.device):
            with torch.no_grad():
                t = teacher(x, features=True)
            s = model.student(x, features=True) if method.init_reads_student else None
        loss = method.init_loss(s, t)
        optim.step(loss, optimizer, scaler, average=params)
        meter.update(loss, i)
        progress.log(i, i, meter, lr=lr)
    meter.check("init-stage loss")
    dist.broadcast_buffers(model)
    dist.broadcast_buffers(trained)
    return {"loss": meter.global_avg(), "lr": lr, **progress.stats()}


def train_one_epoch(model_ddp, teacher, method, state, loader, optimizer, scaler, cfg, ctx, epoch,
                    step, peak_lr):
    model_ddp.train()  # the teacher is not part of model_ddp: it stays in eval mode
    state.eval()  # not trained in the main loop
    meters = {k: log.Meter() for k in ("loss", "ce", "kl", "distill")}
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    lr = schedules.step_decay(epoch, cfg.lr_milestones, peak_lr, cfg.lr_decay)
    optim.set_lr_wd(optimizer, lr)
    zero = torch.zeros((), device=ctx.device)  # the KL term without a teacher
    for i, (x, y, idx, sample) in enumerate(progress):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        idx = idx.to(ctx.device, non_blocking=True)
        sample = sample.to(ctx.device, non_blocking=True)
        with optim.autocast(cfg.amp, ctx.device):
            with torch.no_grad():  # frozen teacher: its features carry no graph
                t = teacher(x, features=True) if teacher is not None else None
            s, z = model_ddp(x, t)
        # losses in float32 (bf16/fp16 softmax, exp and normalisation are not safe)
        ce = F.cross_entropy(s.logits.float(), y)
        kl = (kd_loss(s.logits.float(), t.logits.float(), cfg.kd_temperature) if t is not None
              else zero)
        term = method.loss(s, t, z, idx, sample)  # CRD also moves its memory banks
        loss = cfg.alpha * ce + cfg.beta * kl + cfg.gamma * term
        optim.step(loss, optimizer, scaler)
        for name, value in (("loss", loss), ("ce", ce), ("kl", kl), ("distill", term)):
            meters[name].update(value, step)
        progress.log(i, step, meters["loss"], lr=lr)
        step += 1
    meters["loss"].check()
    return step, {**{k: m.global_avg() for k, m in meters.items()}, "lr": lr, **progress.stats()}


@torch.no_grad()
def student_top1(student, loader, ctx):
    """Test top-1 (%): every rank scores its shard (eval_loader: no padding), counts are summed."""
    student.eval()
    counts = torch.zeros(2, device=ctx.device)  # (correct, total)
    for x, y, _ in loader:
        pred = student(x.to(ctx.device, non_blocking=True)).argmax(dim=1)
        counts += torch.stack([(pred == y.to(ctx.device)).sum(),
                               torch.tensor(len(y), device=ctx.device)])
    correct, total = dist.all_reduce_sum(counts).tolist()
    return 100.0 * correct / total


def param_counts(model, teacher, state, method):
    """(trainable in the main loop: student + head, slides: teacher + student + head + state as
    S000 counts them, every module of RepDistiller's `module_list` plus `criterion_list`, METHODS.md
    section 10: the heads in both, HEADS_COUNTED_TWICE, twice, the other modules once)."""
    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    heads, student = count(model.heads), count(model.student)
    twice = 2 if method in HEADS_COUNTED_TWICE else 1
    return student + heads, count(teacher) + student + twice * heads + count(state)


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    if cfg.distill != "none" and not cfg.teacher_ckpt:
        raise ConfigError(f"--distill {cfg.distill} needs --teacher_ckpt (a {cfg.teacher} trained "
                          f"with --distill none)")
    if cfg.init_epochs < 0:
        raise ConfigError(f"init_epochs={cfg.init_epochs}: the init stage of abound, factor and "
                          f"fsp needs 0 or more")
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights and CRD banks on every rank

    # ----- data: RandomCrop(32, 4) + flip for training (28 px: pad 3), plain test images -----
    mean, std = MEAN_STD.get(cfg.dataset, MEAN_STD["cifar100"])
    size = data.DEFAULT_IMAGE_SIZE[cfg.dataset]
    train_base = data.build_dataset(cfg.dataset, cfg.data_dir, "train",
                                    augment.linear_train_transform(size, mean, std), cfg.download)
    if cfg.train_subset:
        train_base = data.balanced_subset(train_base, cfg.train_subset)
    negatives = cfg.crd_negatives if cfg.distill == "crd" else 0  # drawn by the loader's workers
    train_set = distill_losses.DistillSet(train_base, negatives, cfg.crd_mode == "relax")
    test_set = data.build_dataset(cfg.dataset, cfg.data_dir, "val",
                                  augment.eval_transform(size, mean, std))
    loader = data.train_loader(train_set, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    test_loader = data.eval_loader(test_set, 256, ctx, cfg.num_workers)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)

    # ----- models: frozen teacher; student + the method's head in DDP, its state outside -----
    num_classes = NUM_CLASSES[cfg.dataset]
    channels_last = models.use_channels_last(cfg.student, ctx.device)  # NHWC convs, also on the CPU
    teacher = (load_teacher(cfg.teacher_ckpt, cfg.teacher, num_classes, ctx.device, channels_last)
               if cfg.distill != "none" else None)
    student = build_cifar_model(cfg.student, num_classes)
    method = build_method(cfg, student, teacher, len(train_set), size)
    model, model_ddp, note = dist.prepare(Distiller(student, method.head), ctx, cfg.sync_bn,
                                          cfg.compile, channels_last)
    state = (method.state or nn.Module()).to(ctx.device)
    params, params_slides = param_counts(model, teacher, state, cfg.distill)
    what = f"{cfg.distill}: {cfg.teacher} -> {cfg.student}" if teacher else f"{cfg.student} alone"
    print0(f"{note}; {what}; parameters: {params / 1e6:.3f}M trainable, {params_slides / 1e6:.2f}M "
           f"as the slides count them; {len(train_set)} images, {steps_per_epoch} steps/epoch")

    # ----- optimizer and schedule (the lr is set every epoch in train_one_epoch) -----
    peak_lr = cfg.lr * cfg.batch_size / 64  # the fork: 0.2 x B / 256; RepDistiller: 0.05 at any B
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer("sgd", groups, lr=peak_lr, momentum=cfg.momentum,
                                      nesterov=cfg.nesterov)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)
    # AB, FT, FSP: RepDistiller's init stage, numbered epochs -init_epochs..-1 (one loop, checkpoint
    # and resume for both stages), with an optimizer of its own
    first_epoch, init = 0, {}
    if hasattr(method, "init_loss"):
        first_epoch, trained = -cfg.init_epochs, nn.ModuleList(method.init_modules(student))
        init_lr = method.init_lr * (cfg.batch_size / 64)
        init = dict(init_optimizer=optim.build_optimizer(
            "sgd", optim.param_groups(trained, cfg.weight_decay, cfg.exclude_bias_norm), lr=init_lr,
            momentum=cfg.momentum, nesterov=cfg.nesterov))

    # ----- resume -----
    start_epoch, step, saved = checkpoint.resume(cfg, model=model, optimizer=optimizer,
                                                 scaler=scaler, loss_state=state, **init)
    start_epoch = start_epoch if saved else first_epoch
    best = saved.get("best_top1", 0.0)
    # the slides' 'Training Time' and 'Memory Requirements' cover the whole run: both carry over
    train_time = saved.get("train_time_s", 0.0)
    peak_reserved = saved.get("peak_mem_reserved_gb", 0.0)

    # ----- epoch loop: (init stage,) train, test, log, checkpoint -----
    top1 = None
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        if epoch < 0:  # the init stage
            row = train_init_epoch(model, teacher, method, trained, loader, init["init_optimizer"],
                                   scaler, cfg, ctx, epoch, init_lr)
        else:
            step, row = train_one_epoch(model_ddp, teacher, method, state, loader, optimizer,
                                        scaler, cfg, ctx, epoch, step, peak_lr)
        due = cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if epoch >= 0 and due:
            top1 = student_top1(model.student, test_loader, ctx)
            best = max(best, top1)
            row.update(test_top1=top1, best_test_top1=best)
        train_time += time.perf_counter() - start  # train + test, wall seconds
        row.update(params=params, params_slides=params_slides, train_time_s=train_time)
        if ctx.device.type == "cuda":  # the run's peak: max over epochs (Progress resets CUDA's)
            peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved(ctx.device) / 2**30)
            row.update(peak_mem_reserved_gb=peak_reserved)
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every, model=model, optimizer=optimizer, scaler=scaler,
                              loss_state=state, **init, best_top1=best, train_time_s=train_time,
                              peak_mem_reserved_gb=peak_reserved)
    if top1 is not None:
        print0(f"test top-1 of the last epoch: {top1:.2f}% (best epoch, not the reported number: "
               f"{best:.2f}%)")

    # ----- cleanup -----
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
