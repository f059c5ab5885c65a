"""IFACLR: layer-wise contrastive learning on a ViT (the IFACD slides' appendix A, Rios et al.;
the authors' prototype github.com/arkel23/layerwiseclr at c42438b).

SimCLR with a ViT's layers as extra positives. The CLS tokens of the last N blocks, each through a
new LayerNorm shared by the layers and one projection head, are the views of an image; under SupCon
without labels (Khosla et al. 2020, Eq. 2, L_out) every other view of the same image is a positive
and every view of every other image in the global batch a negative:
    L = -1/|I| sum_i 1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t))
lwclr: one view, the intermediate layers detached; simlwclr: two views, each view's last block
against the other view's last N blocks. `layer_cos` in log.jsonl measures the slides' obstacle,
"layer 1 as similar as layer N".
Reproduces the prototype's defaults (configs/ifaclr/; METHODS.md section 8); the slides report no
numbers. Deviations: ImageNet's mean/std (the prototype: CIFAR's); warmup in whole epochs (its 1000
steps); SupCon's tau / base_tau factor is 1, as in the IFACD fork; the backbone's final LayerNorm is
off the training path (`IFACLR.__init__`); BN heads share batch statistics over the N layers;
simlwclr takes both directions every step (the prototype alternates them: `ifaclr_objective`).

Run
    torchrun --standalone --nproc_per_node=8 ifaclr.py --data_dir /data/imagenet   # lwclr, ViT-S/16
    python ifaclr.py --config configs/ifaclr/cifar10_vit.yaml                      # simlwclr, 1 GPU
    python ifaclr.py --config configs/ifaclr/fashion_mnist_cpu.yaml --device cpu  # CPU minutes
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.config import ConfigError, arg
from common.log import print0
from eval.knn import KNNMonitor


@dataclass(frozen=True)
class Config:
    # method
    method: str = arg("lwclr", "lwclr (one view, layers as positives) or simlwclr (two views)",
                      choices=("lwclr", "simlwclr"))
    layers: int = arg(2, "the last N ViT blocks are positives of each other (prototype: 2)")
    detach_layers: bool = arg(True, "no gradient through the intermediate layers' CLS (prototype: "
                                    "lwclr true, simlwclr false)")
    temperature: float = arg(0.5, "SupCon temperature tau (prototype: 0.5)")
    # data
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and /val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (SimCLR: 0.08)")
    color_strength: float = arg(1.0, "colour distortion strength (prototype: 0.8/0.8/0.8/0.2)")
    blur: bool = arg(True, "Gaussian blur p=0.5 (prototype: on)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto", choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("vit_small", "a ViT (vit_debug: tests; vit_mini: a CPU)",
                    choices=tuple(a for a in models.ARCHS if models.is_vit(a)))
    patch_size: int = arg(16, "ViT patch size")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12, as MoCo v3)")
    freeze_patch_embed: bool = arg(False, "frozen random patch projection (MoCo v3; the "
                                          "prototype trains it)")
    head: str = arg("prototype", "prototype (layerwiseclr heads.py: norm + GELU/ReLU, a norm on "
                                 "the output) or slides (FC, norm, ReLU, FC)",
                    choices=("prototype", "slides"))
    head_norm: str = arg("ln", "the head's norm (prototype: ln; its --bn_proj: bn)",
                         choices=("bn", "ln"))
    proj_layers: int = arg(3, "prototype head layers (prototype: 3)")
    proj_hidden_dim: int = arg(2048, "head hidden width (prototype: 2048)")
    proj_dim: int = arg(2048, "head output width (prototype: 2048)")
    sync_bn: bool = arg(True, "SyncBN across GPUs for BN heads; ignored on the CPU")
    # optimisation
    optimizer: str = arg("sgd", "sgd (prototype: momentum 0.9, no Nesterov), adamw or lars",
                         choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.2e-3, "base lr per 256 images (prototype: 3e-4 at batch 64)")
    weight_decay: float = arg(0.0, "weight decay (prototype: 0)")
    exclude_bias_norm: bool = arg(False, "no weight decay for biases and norm parameters")
    warmup_epochs: int = arg(1, "linear warmup epochs before the cosine (prototype: 1000 steps)")
    epochs: int = arg(100, "training epochs (the prototype documents none)")
    batch_size: int = arg(64, "global batch size (prototype: 64)")
    clip_grad_norm: float = arg(1.0, "clip the global gradient norm; 0 = off (prototype: 1)")
    amp: str = arg("none", "mixed precision on CUDA: none (the prototype's fp32), bf16, fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the model (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/ifaclr", "where last.pt, log.jsonl, config.yaml, backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor every this many epochs (and the last); 0 = off")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ========================= method: per-layer views, SupCon without labels =========================

class IFACLR(nn.Module):
    """Backbone, a new LayerNorm shared by the layers, one head. forward(x) -> z (n, N, D): the
    CLS tokens of the last N blocks, each normalised and projected, the last block last."""

    def __init__(self, backbone, projector, layers, detach):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.layers, self.detach = layers, detach
        self.layer_norm = nn.LayerNorm(backbone.embed_dim)
        backbone.norm.requires_grad_(False)  # off IFACLR's path: it stays a plain standardisation

    def forward(self, x):
        _, tokens = self.backbone.forward_intermediates(x, norm=False)  # depth x (n, 1+T, d)
        cls = [t[:, 0] for t in tokens[-self.layers:]]  # N x (n, d)
        if self.detach:  # lwclr: the intermediate layers pull the last one, not the other way
            cls = [c.detach() for c in cls[:-1]] + cls[-1:]
        h = self.layer_norm(torch.stack(cls, dim=1))  # (n, N, d)
        return self.projector(h.flatten(0, 1)).view(x.shape[0], self.layers, -1)  # (n, N, D)


def ifaclr_loss(z, temperature):
    """SupCon's L_out without labels (the equation above, t = tau). z: (n, V, D), this rank's n
    images x V views (layers, and views of the image), any scale (L2-normalised here). Every row
    is an anchor i; P(i) = the other V - 1 rows of its image; the denominator holds every row of the
    global batch but i (gathered from all ranks with gradient). Returns the mean over this rank's
    n * V anchors."""
    n, v, _ = z.shape
    z = F.normalize(z, dim=2).flatten(0, 1)  # (nV, D): row i*V + j = view j of image i
    z_all = dist.gather_with_grad(z)  # (W*nV, D): rank r's rows at [nV*r, nV*(r+1))
    rows = torch.arange(n * v, device=z.device) + n * v * dist.rank()  # anchors' global rows
    cols = torch.arange(z_all.shape[0], device=z.device)
    own = cols[None, :] == rows[:, None]  # (nV, W*nV): the anchor, left out of the denominator
    positive = (cols[None, :] // v == rows[:, None] // v) & ~own  # the same image, another view
    log_prob = (z @ z_all.T / temperature).masked_fill(own, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (v - 1)).mean()


def ifaclr_objective(cfg, z):
    """lwclr: z (n, N, D), one view's last N layers are the positives. simlwclr: z (2n, N, D), both
    views; each view's last layer with the other view's N layers, both ways, averaged (the
    prototype alternates the two directions, one per step: the same expectation)."""
    if cfg.method == "lwclr":
        return ifaclr_loss(z, cfg.temperature)
    z1, z2 = z.chunk(2)  # (n, N, D) each
    return 0.5 * (ifaclr_loss(torch.cat([z1[:, -1:], z2], dim=1), cfg.temperature)  # (n, 1 + N, D)
                  + ifaclr_loss(torch.cat([z2[:, -1:], z1], dim=1), cfg.temperature))


def view_recipes(cfg, size):
    return [augment.simclr_recipe(size, cfg.color_strength, cfg.blur, cfg.crop_min)]  # both views


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size,
                                  num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed)
    if not 2 <= cfg.layers <= backbone.depth:
        raise ConfigError(f"--layers {cfg.layers}: IFACLR needs 2 <= layers <= the ViT's depth "
                          f"({backbone.depth})")
    d, hidden, out = backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim
    if cfg.head == "slides":  # the slides' contrastive head: FC, LN/BN1d, ReLU, FC
        projector = models.mlp(d, hidden, out, 2, last_norm=False, norm=cfg.head_norm)
    else:  # heads.py ProjectionMLPHead: LN + GELU (BN + ReLU: --bn_proj), a norm on the output
        projector = models.mlp(d, hidden, out, cfg.proj_layers, norm=cfg.head_norm,
                               act="gelu" if cfg.head_norm == "ln" else "relu", layerwiseclr=True)
    return IFACLR(backbone, projector, cfg.layers, cfg.detach_layers)


# ============================================ training ============================================

def train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch, step,
                    total_steps):
    model_ddp.train()
    meter, layer_cos, out_std = log.Meter(), log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        x = torch.cat(views(images))  # (views * n, 3, H, W): lwclr one view, simlwclr two
        with optim.autocast(cfg.amp, ctx.device):
            z = model_ddp(x).float()  # (views * n, N, D); the loss in float32
        loss = ifaclr_objective(cfg, z)
        optim.step(loss, optimizer, scaler, cfg.clip_grad_norm, model_ddp.parameters())
        meter.update(loss, step)
        # the slides' obstacle, "layer 1 as similar as layer N => identity function", measured
        layer_cos.update(F.cosine_similarity(z[:, 0], z[:, -1], dim=-1).mean(), step)
        out_std.update(log.output_std(z[:, -1]), step)  # collapse monitor, on the last layer
        progress.log(i, step, meter, lr=lr)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "out_std": out_std.global_avg(),
                  "layer_cos": layer_cos.global_avg(), **log.output_spectrum(z[:, -1]),
                  **progress.stats()}


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data: SimCLR's recipe, one view (lwclr) or two (simlwclr) -----
    size = data.image_size(cfg)
    num_views = 1 if cfg.method == "lwclr" else 2
    views = augment.ViewMaker(view_recipes(cfg, size), num_views, ctx.device, cfg.aug_device,
                              cfg.dataset, cfg.compile, channels_last=False)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform,
                                 cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile)
    print0(f"{note}; {cfg.method}, the last {cfg.layers} blocks; backbone "
           f"{models.count_params(model.backbone) / 1e6:.2f}M params, head "
           f"{models.count_params(model.projector) / 1e6:.2f}M; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr is set every step in train_one_epoch) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, optimizer=optimizer, scaler=scaler)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch,
                                    step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            row.update(knn.log_row(model.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every, model=model, optimizer=optimizer, scaler=scaler)

    # ----- cleanup (per block: python -m eval.knn --checkpoint OUT/last.pt --layer all) -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone)
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
