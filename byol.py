"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020, arXiv:2006.07733).

An online network (backbone f, projector g, predictor q) predicts the target network's projection
of the other view of the same image; the target (f', g', no predictor) gets no gradient and is an
exponential moving average of the online weights (Sec. 3.1). There are no negatives; the loss is
symmetrised by swapping the views, L^BYOL = L + L~, with
    L = || q(z1) / |q(z1)| - sg(z'2) / |sg(z'2)| ||^2 = 2 - 2 cos(q(z1), sg(z'2))         (Eq. 2)
Reproduces (configs/byol/; each YAML header gives the source and the reported numbers):
- ImageNet ResNet-50, Sec. 3.3 (the defaults): imagenet_resnet50.yaml;
- SDSSL's BYOL baseline, ViT-S/16 (arXiv:2111.12958, Table 1): imagenet_vit_small.yaml;
- solo-learn's CIFAR-10/100 ResNet-18: cifar10_resnet18.yaml, cifar100_resnet18.yaml.
Deviations (the detail is at the named line or flag):
- bf16 autocast on CUDA by default: `--amp`;
- the two views in separate passes (SDSSL's byol_pytorch concatenates them): `BYOL`;
- the target is outside DDP, so its BN running statistics are per rank: `dist.broadcast_buffers`;
- a k-NN monitor of the target backbone instead of a linear probe: `--eval_every`.

Run
    torchrun --standalone --nproc_per_node=8 byol.py \
        --config configs/byol/imagenet_resnet50.yaml --data_dir DIR
    torchrun --standalone --nproc_per_node=1 byol.py --config configs/byol/cifar10_resnet18.yaml
    python byol.py --dataset fake --arch resnet8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                  # a smoke run on the CPU
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.config import arg
from common.log import print0
from eval.knn import KNNMonitor


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and /val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (paper: 0.08)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    blur: bool = arg(True, "Gaussian blur p 1.0 / 0.1 on the two views (Table 6); solo-learn's "
                           "CIFAR: off")
    # model
    arch: str = arg("resnet50", "backbone (vit_debug: tests; vit_mini and the CIFAR zoo, "
                                "resnet8 ... wrn_40_2: small, for a CPU)", choices=models.ARCHS)
    patch_size: int = arg(16, "ViT patch size (16 or 32)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12; SDSSL's ViT-S: 6)")
    freeze_patch_embed: bool = arg(True, "ViT: frozen random patch projection (MoCo v3, SDSSL)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (BYOL's "
                                         "haiku BlockV1; solo-learn's CIFAR runs: false)")
    proj_hidden_dim: int = arg(4096, "projector hidden width (paper: 4096)")
    proj_dim: int = arg(256, "projector / predictor output dimension (paper: 256)")
    pred_hidden_dim: int = arg(4096, "predictor hidden width (paper: 4096)")
    last_bias: bool = arg(False, "ResNet heads: a bias in the last Linear (BYOL's networks.py: "
                                 "false; solo-learn: true)")
    sync_bn: bool = arg(True, "SyncBN across GPUs (the paper's BN over the global batch); ignored "
                              "on the CPU")
    # loss, target network and optimisation
    base_momentum: float = arg(0.996, "tau_base, the target's EMA decay at step 0 (paper: 0.996)")
    optimizer: str = arg("lars", "lars (paper), adamw (ViT) or sgd",
                         choices=("lars", "adamw", "sgd"))
    lr: float = arg(0.2, "base learning rate per 256 images; the peak is lr x batch_size / 256 "
                         "(paper: 0.2)")
    weight_decay: float = arg(1.5e-6, "weight decay (paper: 1.5e-6; AdamW ViT: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay (nor LARS adaptation) on biases, norms")
    warmup_epochs: int = arg(10, "linear warmup epochs before the cosine decay (paper: 10)")
    epochs: int = arg(1000, "training epochs (paper: 1000; also 300)")
    batch_size: int = arg(4096, "global batch size over all GPUs (paper: 4096)")
    lars_eta: float = arg(0.001, "LARS trust coefficient (paper: 0.001; solo-learn's CIFAR "
                                 "runs: 0.02)")
    lars_clip: bool = arg(False, "LARS: cap the local rate at the global one (solo-learn's CIFAR "
                                 "runs: true)")
    amp: str = arg("bf16", "mixed precision on CUDA: none (SDSSL's fp32), bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the online model (and the batched augmentation's "
                               "hue op)")
    # run
    output_dir: str = arg("./out/byol", "where last.pt, log.jsonl, config.yaml, backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor (k 20 and 200, T 0.07) of the target backbone every "
                              "this many epochs (and the last); 0 = off. The paper's linear "
                              "probe (solo-learn: an online linear head) is not here")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ========================== method: online / target networks, loss, EMA ==========================

class BYOL(nn.Module):
    """Backbone f -> projector g -> predictor q (the online network); without a predictor, the
    target network (Fig. 2). forward(x1, x2) encodes the two views in separate passes, so BN
    normalises each view over its own batch, as BYOL's code (SDSSL's byol_pytorch concatenates)."""

    def __init__(self, backbone, projector, predictor=None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def encode(self, x):
        z = self.projector(self.backbone(x))  # (n, proj_dim)
        return z if self.predictor is None else self.predictor(z)

    def forward(self, x1, x2):
        return self.encode(x1), self.encode(x2)


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size,
                                  num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    if models.is_vit(cfg.arch):
        # SDSSL's ViT baseline: MoCo v3's heads (3-layer projector, 2-layer predictor, bias-free
        # Linears) without the output BN ("BN ... to all output layers except BYOL", Sec. 4.1).
        projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3,
                               last_norm=False)
        predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2,
                               last_norm=False)
    else:
        # Sec. 3.3: Linear 4096 -> BN -> ReLU -> Linear 256, the same for projector and predictor;
        # the output Linear has no bias (networks.py: hk.Linear(output_size, with_bias=False)).
        head = dict(num_layers=2, last_norm=False, last_bias=cfg.last_bias)
        projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, **head)
        predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, **head)
    return BYOL(backbone, projector, predictor)


def build_target(model):
    """f', g': copies of the online backbone and projector (the paper initialises xi = theta),
    frozen: they change only through `ema_update`. Never wrapped in DDP; forward under no_grad."""
    return BYOL(copy.deepcopy(model.backbone),
                copy.deepcopy(model.projector)).requires_grad_(False)


@torch.no_grad()
def ema_update(target, model, tau):
    """Sec. 3.1: xi <- tau * xi + (1 - tau) * theta, for every parameter of the target, matched by
    name with the online network's."""
    online = dict(model.named_parameters())
    names, xi = zip(*target.named_parameters())
    optim.ema_(list(xi), [online[name] for name in names], tau)


def byol_loss(p, z):
    """Eq. 2, one direction, averaged over the batch.

    p: (n, D) online predictions of one view; z: (n, D) target projections of the other view,
    detached here (stop-gradient, Sec. 3.1). Local to this rank: no cross-rank term. Keeps the
    dtype of p.
    """
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def view_recipes(cfg, size):
    """Table 6's asymmetric pair (view 1 always blurred, view 2 rarely blurred and sometimes
    solarised)."""
    return augment.byol_recipes(size, crop_min=cfg.crop_min, blur=cfg.blur)


# ============================================ training ============================================

def train_one_epoch(model_ddp, views, model, target, loader, optimizer, scaler, cfg, ctx, epoch,
                    step, total_steps):
    model_ddp.train()
    target.train()  # the target's BN uses batch statistics too (never its running statistics)
    meter, out_std = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Sec. 3.3)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        x1, x2 = views(images)  # (n, 3, H, W) each, on the device
        with optim.autocast(cfg.amp, ctx.device):
            p1, p2 = model_ddp(x1, x2)  # (n, proj_dim) each: online predictions
            with torch.no_grad():
                z1, z2 = target(x1, x2)  # (n, proj_dim) each: target projections
        # L + L~: each prediction against the target projection of the other view; in float32
        loss = byol_loss(p1.float(), z2.float()) + byol_loss(p2.float(), z1.float())
        optim.step(loss, optimizer, scaler)
        # Sec. 3.1: the target moves right after the online update, with the tau of the step just
        # taken (Sec. 3.3: cosine from tau_base to 1 over the run, per step)
        tau = schedules.ema_momentum(step, total_steps, cfg.base_momentum)
        ema_update(target, model, tau)
        meter.update(loss, step)
        out_std.update(log.output_std(z1), step)  # collapse monitor, on the target projections
        progress.log(i, step, meter, lr=lr, tau=tau)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "tau": tau,
                  "out_std": out_std.global_avg(), **log.output_spectrum(z1), **progress.stats()}


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data -----
    size = data.image_size(cfg)
    channels_last = models.use_channels_last(cfg.arch, ctx.device)
    views = augment.ViewMaker(view_recipes(cfg, size), 2, ctx.device, cfg.aug_device, cfg.dataset,
                              cfg.compile, channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform,
                                 cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model: online network (in DDP) and its EMA target, copied after DDP's broadcast -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    target = build_target(model)
    print0(f"{note}; params: backbone {models.count_params(model.backbone) / 1e6:.2f}M, "
           f"projector {models.count_params(model.projector) / 1e6:.2f}M, predictor "
           f"{models.count_params(model.predictor) / 1e6:.2f}M; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr is set every step in train_one_epoch; wd is constant) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0,
                                      lars_eta=cfg.lars_eta, lars_clip=cfg.lars_clip)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, teacher=target, optimizer=optimizer,
                                             scaler=scaler)

    # ----- epoch loop: train, log, evaluate (target network), checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, model, target, loader, optimizer, scaler,
                                    cfg, ctx, epoch, step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            dist.broadcast_buffers(target)  # per-rank BN statistics (outside DDP): use rank 0's
            row.update(knn.log_row(target.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every,
                              evaluate="model",  # BYOL keeps the online encoder (Sec. 3.1)
                              model=model, teacher=target, optimizer=optimizer, scaler=scaler)

    # ----- cleanup: export both backbones -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, target.backbone, "model")
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
