"""Linear probe on a frozen backbone (the linear evaluation protocol of SimCLR / MoCo v3 / DINO).

    python -m eval.linear --checkpoint OUT/last.pt                        # fast: precomputed features
    python -m eval.linear --checkpoint OUT/last.pt --mode full --epochs 90 --lr 0.1 --batch_size 1024
    torchrun --standalone --nproc_per_node=8 -m eval.linear --checkpoint OUT/last.pt --mode full ...
    python -m eval.linear --checkpoint OUT/last.pt --layer all --plot layers.png   # one probe per ViT block

`full`: random-resized-crop (pad-and-crop for small images) + flip every step, the backbone in eval mode under
no_grad, SGD with momentum, cosine schedule, lr = base_lr x batch / 256 (MoCo v3: 0.1 for ResNets, 3 for ViTs).
`fast`: features of the un-augmented images are computed once; the probe is trained on them (standardised per
dimension, which is still a linear classifier). Minutes instead of hours; usually within a point or two of `full`
on CIFAR. Both check at the end that the backbone's weights and BN statistics did not change (MoCo's sanity check).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, data, dist, schedules
from common.config import ConfigError, arg, parse, run
from common.log import print0
from eval.knn import eval_dataset, extract, features, select_layers


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, snapshot):
    for k, v in module.state_dict().items():
        if not torch.equal(v, snapshot[k]):
            raise AssertionError(f"backbone tensor {k} changed during linear evaluation")


def _accuracy(heads, feats, labels):
    """Correct predictions per head, summed over ranks."""
    return [float(dist.all_reduce_sum((h(f).argmax(1) == labels).sum())) for h, f in zip(heads, feats)]


def train_fast(heads, train_f, train_y, cfg, ctx):
    """Minibatch SGD on precomputed features (identical on every rank: same seed, same data)."""
    params = [p for h in heads for p in h.parameters()]
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    n = train_y.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(train_y.device)
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = schedules.cosine(epoch * steps_per_epoch + i, cfg.epochs * steps_per_epoch, lr)
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = sum(F.cross_entropy(h(f[idx]), train_y[idx]) for h, f in zip(heads, train_f))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def train_full(heads, backbone, layers, loader, cfg, ctx):
    """The augmented protocol: every step is a fresh crop; only the heads (DDP-wrapped) learn."""
    heads_ddp = dist.ddp(heads, ctx)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule
    opt = torch.optim.SGD(heads.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    for epoch in range(cfg.epochs):
        loader.sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = schedules.cosine(epoch * len(loader) + i, total, lr)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with torch.no_grad():
                feats = features(backbone, x, layers)
            logits = heads_ddp(torch.stack(feats))  # (L, B, C)
            loss = sum(F.cross_entropy(l, y) for l in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print0(f"linear epoch {epoch}: loss {loss.item():.4f}")


class Heads(nn.ModuleList):
    """One linear classifier per evaluated layer; forward takes (L, B, D) and returns (L, B, C)."""

    def forward(self, feats):
        return torch.stack([h(f) for h, f in zip(self, feats)])


def linear_eval(backbone, dataset, data_dir, image_size, ctx, cfg, layers=None, class_list=""):
    """Train and test linear probes on a frozen backbone; returns the top-1 % per evaluated layer."""
    backbone.eval().requires_grad_(False)
    before = _snapshot(backbone)
    val = eval_dataset(dataset, data_dir, "val", image_size, cfg.download, class_list)
    val_loader = data.eval_loader(val, cfg.batch_size // ctx.world_size, ctx, cfg.num_workers)
    if cfg.mode == "fast":
        train = eval_dataset(dataset, data_dir, "train", image_size, cfg.download, class_list)
        train_f, train_y = extract(backbone, data.eval_loader(train, 256, ctx, cfg.num_workers), ctx, layers,
                                   unit_norm=False)
        stats = [(f.mean(0), f.std(0) + 1e-6) for f in train_f]  # standardise: a fixed affine map, still linear
        train_f = [(f - m) / s for f, (m, s) in zip(train_f, stats)]
    else:
        train = data.build_dataset(dataset, data_dir, "train", augment.linear_train_transform(image_size), cfg.download,
                                   class_list)
        train_y = None
    torch.manual_seed(cfg.seed)
    heads = Heads([nn.Linear(backbone.embed_dim, data.num_classes(train)) for _ in (layers or [None])]).to(ctx.device)
    for h in heads:
        nn.init.normal_(h.weight, std=0.01)
        nn.init.zeros_(h.bias)
    if cfg.mode == "fast":
        train_fast(heads, train_f, train_y, cfg, ctx)
    else:
        loader = data.train_loader(train, dist.per_rank(cfg.batch_size, ctx.world_size), ctx, cfg.num_workers, cfg.seed)
        train_full(heads, backbone, layers, loader, cfg, ctx)
    with torch.no_grad():
        val_f, val_y = extract(backbone, val_loader, ctx, layers, gather_all=False, unit_norm=False)
        if cfg.mode == "fast":
            val_f = [(f - m) / s for f, (m, s) in zip(val_f, stats)]
        correct = _accuracy(heads, val_f, val_y)
    assert_unchanged(backbone, before)
    return [100.0 * c / len(val) for c in correct]


@dataclass(frozen=True)
class Config:
    checkpoint: str = arg("", "last.pt of any training script (required)")
    which: str = arg("model", "weights to evaluate: model (online/student) or teacher", choices=("model", "teacher"))
    dataset: str = arg("", "labeled dataset; empty = the checkpoint's")
    data_dir: str = arg("", "dataset root; empty = the checkpoint's")
    download: bool = arg(False, "download a torchvision dataset if missing")
    image_size: int = arg(0, "crop size; 0 = the checkpoint's")
    layer: str = arg("last", "last, all (one probe per ViT block) or a block number 1..depth")
    mode: str = arg("fast", "fast (precomputed features) or full (augmented, MoCo v3 protocol)",
                    choices=("fast", "full"))
    epochs: int = arg(100, "probe epochs (MoCo v3: 90, DINO: 100)")
    batch_size: int = arg(256, "global batch")
    lr: float = arg(0.1, "base lr per 256 images (MoCo v3: 0.1 ResNet, 3.0 ViT in full mode)")
    weight_decay: float = arg(0.0, "weight decay of the probe")
    num_workers: int = arg(4, "data-loading workers per rank")
    seed: int = arg(0, "seed of the probe's init and shuffling")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    plot: str = arg("", "with --layer all: write the per-layer curve to this PNG")


def main(argv=None):
    cfg = parse(Config, argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required (a last.pt written by a training script)")
    ctx = dist.setup(cfg.device)
    backbone, train_cfg = checkpoint.load_backbone(cfg.checkpoint, cfg.which)
    backbone.to(ctx.device)
    dataset, data_dir = cfg.dataset or train_cfg["dataset"], cfg.data_dir or train_cfg["data_dir"]
    size = cfg.image_size or train_cfg.get("image_size") or data.DEFAULT_IMAGE_SIZE[dataset]
    layers = select_layers(backbone, cfg.layer)
    top1 = linear_eval(backbone, dataset, data_dir, size, ctx, cfg, layers,
                       train_cfg.get("class_list", "") if not cfg.dataset else "")
    if layers is None:
        print0(f"linear ({cfg.mode}) top-1 {top1[0]:.2f}")
    else:
        from eval.layers import report
        report(f"linear {cfg.mode} ({dataset}, {cfg.which})", layers, [{"linear": a} for a in top1], cfg.plot)
    dist.cleanup()


if __name__ == "__main__":
    run(main)
