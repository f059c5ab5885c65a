"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, arXiv:2006.07733).

An online network (backbone f_theta, projector g_theta, predictor q_theta) predicts the target network's projection
of another view of the same image; the target (f_xi, g_xi: no predictor) is an exponential moving average of the
online weights and gets no gradient. Loss (Eq. 2): the squared distance of the L2-normalised prediction and target
projection, 2 - 2 cos(q_theta(z_theta), sg(z'_xi)), symmetrised by swapping the views (L + L~). No negatives.
The target decay follows tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 per step k (Sec. 3.3), and the target is
updated right after the online network's optimizer step (Sec. 3.1: "xi <- tau xi + (1 - tau) theta" follows the
optimizer update of theta), with the tau of the step just taken.

Reproduces
- ResNet-50 on ImageNet (default; `configs/byol/imagenet_resnet50.yaml`): Sec. 3.3: batch 4096, LARS
  base lr 0.2 x B/256, wd 1.5e-6 (biases and BN excluded from wd and LARS adaptation), 10 warmup epochs then
  cosine, 1000 epochs, tau_base 0.996, projector and predictor Linear 4096 -> BN -> ReLU -> Linear 256 (no output
  BN, no bias in the last Linear: networks.py), asymmetric augmentation (Table 6: blur p 1.0 / 0.1, solarize p 0 /
  0.2), the last BN of every residual block initialised to zero (haiku BlockV1 in the authors' code). Paper: 74.3%
  linear top-1.
- ViT-S/16 (`imagenet_vit_small.yaml`): SDSSL's BYOL baseline (Jang et al., arXiv:2111.12958, Table 1; code
  `pl_train_byol.py`): 6 heads, frozen patch projection, MoCo v3 heads without output BN (3-layer projector
  4096 -> 256, 2-layer predictor), AdamW base lr 1.5e-4, wd 0.1 (biases and 1-D excluded), 40 warmup epochs,
  300 epochs, batch 1024, tau 0.996 -> 1. Paper: 66.0 k-NN / 70.3 linear.
- CIFAR-10/100 ResNet-18 (`cifar10_resnet18.yaml`, `cifar100_resnet18.yaml`): solo-learn's settings.
Known deviations
- bf16 autocast on CUDA by default (`--amp none` for SDSSL's fp32).
- The target network is not inside DDP, so its BN running statistics are per rank. Training never reads them (BN
  uses batch statistics); they are taken from rank 0 before each k-NN evaluation.
- The two views go through the networks in separate passes (BN statistics per view, as the paper's code), where
  SDSSL's byol_pytorch concatenates them.
- CIFAR (solo-learn): warmup starts at lr 0 (solo-learn: 3e-5); the CIFAR stem pads by 1 (solo-learn: 2); a k-NN
  monitor instead of solo-learn's online linear classifier.
- k-NN monitor (k = 20 and 200, T = 0.07) on the target backbone instead of the paper's linear evaluation; the paper
  evaluates the online encoder (Sec. 3.1), which last.pt names for the eval tools' `--which auto`.

Run
    torchrun --standalone --nproc_per_node=8 byol.py --config configs/byol/imagenet_resnet50.yaml --data_dir DIR
    torchrun --standalone --nproc_per_node=1 byol.py --config configs/byol/cifar10_resnet18.yaml
    python byol.py --dataset fake --arch resnet18 --batch_size 8 --epochs 1 --max_steps_per_epoch 2 --device cpu
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
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and data_dir/val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (paper: 0.08)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader workers), gpu (batched on the "
                                  "training device; in-memory datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    blur: bool = arg(True, "Gaussian blur p 1.0 / 0.1 on the two views (Table 6); solo-learn's CIFAR: off")
    # model
    arch: str = arg("resnet50", "backbone (vit_debug: tests; vit_mini and the CIFAR zoo, resnet8 ... "
                                           "wrn_40_2: small, for a CPU)", choices=models.ARCHS)
    patch_size: int = arg(16, "ViT patch size (16 or 32)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12; SDSSL's ViT-S uses 6)")
    freeze_patch_embed: bool = arg(True, "ViT: frozen random patch projection (MoCo v3, SDSSL)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (BYOL's haiku BlockV1; "
                                         "solo-learn's CIFAR runs: false)")
    proj_hidden_dim: int = arg(4096, "projector hidden width (paper: 4096)")
    proj_dim: int = arg(256, "projector / predictor output dimension (paper: 256)")
    pred_hidden_dim: int = arg(4096, "predictor hidden width (paper: 4096)")
    last_bias: bool = arg(False, "ResNet heads: a bias in the last Linear (BYOL networks.py: false; solo-learn: true)")
    sync_bn: bool = arg(True, "SyncBN across GPUs (the paper's BN over the global batch); ignored on the CPU")
    # loss, target network and optimisation
    base_momentum: float = arg(0.996, "tau_base: target decay at step 0, cosine-increased to 1 (paper: 0.996)")
    optimizer: str = arg("lars", "lars (paper), adamw (ViT) or sgd", choices=("lars", "adamw", "sgd"))
    lr: float = arg(0.2, "base learning rate per 256 images; the peak lr is lr x batch_size / 256 (paper: 0.2)")
    weight_decay: float = arg(1.5e-6, "weight decay (paper: 1.5e-6; AdamW ViT: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay (and no LARS adaptation) for biases and norm parameters")
    warmup_epochs: int = arg(10, "linear warmup epochs before the cosine decay (paper: 10)")
    epochs: int = arg(1000, "training epochs (paper: 1000; also 300)")
    batch_size: int = arg(4096, "global batch size over all GPUs (paper: 4096)")
    lars_eta: float = arg(0.001, "LARS trust coefficient (paper: 0.001; solo-learn's CIFAR runs: 0.02)")
    lars_clip: bool = arg(False, "LARS: cap the local rate at the global one (solo-learn's CIFAR runs: true)")
    amp: str = arg("bf16", "mixed precision on CUDA: none, bf16 or fp16", choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the online model (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/byol", "where last.pt, log.jsonl, config.yaml and backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = the full epoch (tests use 2)")
    eval_every: int = arg(10, "k-NN monitor of the target backbone every this many epochs (and after the last)")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours, evenly spaced (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags given on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ================================= method: online / target networks, loss, EMA =================================

class BYOL(nn.Module):
    """Backbone f -> projector g -> predictor q (the online network). Without a predictor it is the target
    network (Fig. 2: the target has no predictor). forward(x1, x2) encodes the two views in separate passes."""

    def __init__(self, backbone, projector, predictor=None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def encode(self, x):
        z = self.projector(self.backbone(x))  # (n, proj_dim)
        return z if self.predictor is None else self.predictor(z)

    def forward(self, x1, x2):
        return self.encode(x1), self.encode(x2)


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size, num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    if models.is_vit(cfg.arch):
        # SDSSL's ViT baseline: MoCo v3's heads (3-layer projector, 2-layer predictor, bias-free Linears) without
        # the output BN ("BN ... to all output layers except BYOL", SDSSL Sec. 4.1).
        projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3, last_norm=False)
        predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_norm=False)
    else:
        # Sec. 3.3: Linear 4096 -> BN -> ReLU -> Linear 256, the same for projector and predictor; the output Linear
        # has no bias (networks.py: hk.Linear(output_size, with_bias=False)).
        head = dict(num_layers=2, last_norm=False, last_bias=cfg.last_bias)
        projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, **head)
        predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, **head)
    return BYOL(backbone, projector, predictor)


def build_target(model):
    """f_xi, g_xi: copies of the online backbone and projector (the paper initialises xi = theta), frozen: they
    change only through `ema_update`. Never wrapped in DDP; forward only under no_grad."""
    return BYOL(copy.deepcopy(model.backbone), copy.deepcopy(model.projector)).requires_grad_(False)


@torch.no_grad()
def ema_update(target, model, tau):
    """Sec. 3.1: xi <- tau * xi + (1 - tau) * theta, for every parameter of the target, matched by name with the
    online network's."""
    online = dict(model.named_parameters())
    for name, p_xi in target.named_parameters():
        p_xi.mul_(tau).add_(online[name].detach(), alpha=1.0 - tau)


def byol_loss(p, z):
    """Eq. 2, one direction: mean over the batch of ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z).

    p: (n, D) online predictions of one view; z: (n, D) target projections of the other view, detached here
    (stop-gradient, Sec. 3.1). The training step adds both directions (L^BYOL = L + L~, Sec. 3.1). Local to this
    rank: no cross-rank term. Keeps the dtype of p.
    """
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def view_recipes(cfg, size):
    """Table 6's asymmetric pair (view 1 always blurred, view 2 rarely blurred and sometimes solarised)."""
    return augment.byol_recipes(size, crop_min=cfg.crop_min, blur=cfg.blur)


# ================================================== training ==================================================

def train_one_epoch(model_ddp, views, model, target, loader, optimizer, scaler, cfg, ctx, epoch, step,
                    total_steps):
    model_ddp.train()
    target.train()  # the target's BN uses batch statistics too
    meter, out_std = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Sec. 3.3: 0.2 x BatchSize/256)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        x1, x2 = views(images)  # (n, 3, H, W) each, on the device
        with optim.autocast(cfg.amp, ctx.device):
            p1, p2 = model_ddp(x1, x2)  # (n, proj_dim) each: online predictions
            with torch.no_grad():
                z1, z2 = target(x1, x2)  # (n, proj_dim) each: target projections
        # Sec. 3.1: L + L~, each prediction against the target projection of the other view; the loss in float32.
        loss = byol_loss(p1.float(), z2.float()) + byol_loss(p2.float(), z1.float())
        optim.step(loss, optimizer, scaler)
        # Sec. 3.1/3.3: the target moves right after the online update, with the decay rate of this step k.
        tau = schedules.ema_momentum(step, total_steps, cfg.base_momentum)
        ema_update(target, model, tau)
        meter.update(loss, step)
        out_std.update(log.output_std(z1), step)  # collapse monitor, on the target projections
        progress.log(i, step, meter, lr=lr, tau=tau)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "tau": tau, "out_std": out_std.global_avg(),
                  **progress.stats()}


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
    views = augment.ViewMaker(view_recipes(cfg, size), 2, ctx.device, cfg.aug_device, cfg.dataset, cfg.compile,
                              channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform, cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model: online network (trained, in DDP) and target network (EMA copy taken after DDP's broadcast) -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile, channels_last)
    target = build_target(model)
    print0(f"{note}; params: backbone {models.count_params(model.backbone) / 1e6:.2f}M, projector "
           f"{models.count_params(model.projector) / 1e6:.2f}M, predictor "
           f"{models.count_params(model.predictor) / 1e6:.2f}M; {len(dataset)} images, {steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr is set every step in train_one_epoch, wd stays constant) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0,
                                      lars_eta=cfg.lars_eta, lars_clip=cfg.lars_clip)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, teacher=target, optimizer=optimizer, scaler=scaler)

    # ----- epoch loop: train, log, evaluate (target network), checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, model, target, loader, optimizer, scaler, cfg, ctx, epoch, step,
                                    cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            dist.broadcast_buffers(target)  # per-rank BN statistics (outside DDP): evaluate with rank 0's
            row.update(knn.log_row(target.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg), cfg.save_every,
                              evaluate="model",  # BYOL keeps the online encoder (Sec. 3.1)
                              model=model, teacher=target, optimizer=optimizer, scaler=scaler)

    # ----- cleanup: export both backbones; the online one is what BYOL keeps (Sec. 3.1) -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, target.backbone, "model")
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
