"""Linear probe on a frozen backbone
(the linear evaluation protocols of SimCLR / MoCo v3 / DINO / SimSiam).

    python -m eval.linear --checkpoint OUT/last.pt          # fast: precomputed features
    python -m eval.linear --checkpoint OUT/last.pt --mode full --epochs 90 --lr 0.1 \
        --batch_size 1024
    torchrun --standalone --nproc_per_node=8 -m eval.linear \
        --config configs/eval/linear_dino_vit_small.yaml --checkpoint OUT/last.pt \
        --data_dir /data/imagenet                           # a paper's protocol (configs/eval/)
    python -m eval.linear --checkpoint OUT/last.pt --layer all \
        --plot layers.png                                   # one probe per block or stage

`full`: random-resized-crop (pad-and-crop for small images) + flip every step, the backbone in eval
mode under no_grad, SGD with momentum (or LARS: SimSiam / GSG), cosine schedule,
lr = base_lr x batch / 256 (MoCo v3: 0.1 for ResNets, 3 for ViTs; DINO: 0.001; SimSiam: LARS 0.1 at
batch 4096, where its paper says 0.02). DINO's ViT features: --n_last_blocks 4 (ViT-S) or 1 with
--avgpool_patchtokens true (ViT-B), bicubic resize for the test images. `--which auto` (the default)
probes the network the checkpoint's paper evaluates. Prints top-1 and top-5.
`fast`: features of the un-augmented images are computed once; the probe is trained on them
(standardised per dimension, which is still a linear classifier). Minutes instead of hours; usually
within a point or two of `full` on CIFAR. Both check at the end that the backbone's weights and BN
statistics did not change (MoCo's sanity check).
"""
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, data, dist, optim, schedules
from common.checkpoint import WHICH
from common.config import ConfigError, arg, parse, run
from common.log import print0
from eval.knn import eval_dataset, extract, feature_dims, features, select_layers


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, snapshot):
    for k, v in module.state_dict().items():
        if not torch.equal(v, snapshot[k]):
            raise AssertionError(f"backbone tensor {k} changed during linear evaluation")


def accuracy(heads, feats, labels):
    """(top-1, top-5) correct predictions per head, summed over ranks."""
    out = []
    for h, f in zip(heads, feats):
        logits = h(f)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        out.append(dist.all_reduce_sum(torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
                                       .float()).tolist())
    return out


def build_optimizer(heads, cfg, lr):
    """SGD with momentum 0.9 (MoCo v3, DINO), or LARS (SimSiam's main_lincls.py: apex LARC around
    that SGD, trust 0.001, no clipping). Both treat the bias like the weight: decay (0 in every
    protocol here) and adaptation."""
    groups = optim.param_groups(heads, cfg.weight_decay, exclude_bias_norm=False)
    return optim.build_optimizer(cfg.optimizer, groups, lr=lr, momentum=0.9)


def train_fast(heads, train_f, train_y, cfg, ctx):
    """Minibatch SGD on precomputed features (identical on every rank: same seed, same data)."""
    lr = cfg.lr * cfg.batch_size / 256
    opt = build_optimizer(heads, cfg, lr)
    n = train_y.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(train_y.device)
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = schedules.cosine(epoch * steps_per_epoch + i,
                                           cfg.epochs * steps_per_epoch, lr)
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = sum(F.cross_entropy(h(f[idx]), train_y[idx]) for h, f in zip(heads, train_f))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def train_full(heads, backbone, layers, loader, cfg, ctx):
    """The augmented protocol: every step is a fresh crop; only the heads (DDP-wrapped) learn."""
    heads_ddp = dist.ddp(heads, ctx)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule
    opt = build_optimizer(heads, cfg, lr)
    total = cfg.epochs * len(loader)
    for epoch in range(cfg.epochs):
        loader.sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = schedules.cosine(epoch * len(loader) + i, total, lr)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with torch.no_grad():
                feats = features(backbone, x, layers, cfg.n_last_blocks, cfg.avgpool_patchtokens)
            logits = heads_ddp(feats)  # [(B, C)] per layer
            loss = sum(F.cross_entropy(l, y) for l in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print0(f"linear epoch {epoch}: loss {loss.item():.4f}")


class Heads(nn.ModuleList):
    """One linear classifier per evaluated layer; forward takes [(B, D_l)] and returns [(B, C)]."""

    def forward(self, feats):
        return [h(f) for h, f in zip(self, feats)]


def linear_eval(backbone, dataset, data_dir, image_size, ctx, cfg, layers=None, class_list=""):
    """Train and test linear probes on a frozen backbone; returns [top-1 %, top-5 %] per evaluated
    layer."""
    backbone.eval().requires_grad_(False)
    before = _snapshot(backbone)
    protocol = dict(n_last_blocks=cfg.n_last_blocks, avgpool_patchtokens=cfg.avgpool_patchtokens)
    if (cfg.n_last_blocks > 1 or cfg.avgpool_patchtokens) \
            and (layers or not hasattr(backbone, "depth")
                 or not 1 <= cfg.n_last_blocks <= backbone.depth):
        raise ConfigError("--n_last_blocks / --avgpool_patchtokens (DINO's protocol) need a ViT "
                          "with at least n_last_blocks blocks, and --layer last")
    val = eval_dataset(dataset, data_dir, "val", image_size, cfg.download, class_list, cfg.resize,
                       cfg.interpolation)
    val_loader = data.eval_loader(val, cfg.batch_size // ctx.world_size, ctx, cfg.num_workers)
    if cfg.mode == "fast":
        train = eval_dataset(dataset, data_dir, "train", image_size, cfg.download, class_list,
                             cfg.resize, cfg.interpolation)
        train_f, train_y = extract(backbone, data.eval_loader(train, 256, ctx, cfg.num_workers),
                                   ctx, layers, unit_norm=False, **protocol)
        # standardise: a fixed affine map, still linear
        stats = [(f.mean(0), f.std(0) + 1e-6) for f in train_f]
        train_f = [(f - m) / s for f, (m, s) in zip(train_f, stats)]
    else:
        train = data.build_dataset(dataset, data_dir, "train",
                                   augment.linear_train_transform(image_size), cfg.download,
                                   class_list)
        train_y = None
    torch.manual_seed(cfg.seed)
    dims = feature_dims(backbone, image_size, layers, **protocol)
    heads = Heads([nn.Linear(d, data.num_classes(train)) for d in dims]).to(ctx.device)
    for h in heads:
        nn.init.normal_(h.weight, std=0.01)
        nn.init.zeros_(h.bias)
    if cfg.mode == "fast":
        train_fast(heads, train_f, train_y, cfg, ctx)
    else:
        loader = data.train_loader(train, dist.per_rank(cfg.batch_size, ctx.world_size), ctx,
                                   cfg.num_workers, cfg.seed)
        train_full(heads, backbone, layers, loader, cfg, ctx)
    with torch.no_grad():
        val_f, val_y = extract(backbone, val_loader, ctx, layers, gather_all=False, unit_norm=False,
                               **protocol)
        if cfg.mode == "fast":
            val_f = [(f - m) / s for f, (m, s) in zip(val_f, stats)]
        correct = accuracy(heads, val_f, val_y)
    assert_unchanged(backbone, before)
    return [[100.0 * c / len(val) for c in pair] for pair in correct]


@dataclass(frozen=True)
class Config:
    config: str = arg("", "a protocol YAML (configs/eval/linear_*.yaml); flags override it")
    checkpoint: str = arg("", "last.pt of any training script (required)")
    which: str = arg("auto", "weights to evaluate: auto (what the checkpoint's paper evaluates), "
                     "model (online/student) or teacher", choices=WHICH)
    dataset: str = arg("", "labeled dataset; empty = the checkpoint's")
    data_dir: str = arg("", "dataset root; empty = the checkpoint's")
    download: bool = arg(False, "download a torchvision dataset if missing")
    image_size: int = arg(0, "crop size; 0 = the checkpoint's")
    resize: str = arg("short", "test images: resize the short side (short) or both (square) to "
                               "image_size / 0.875", choices=("short", "square"))
    interpolation: str = arg("bilinear", "test-image resize interpolation (DINO: bicubic)",
                             choices=("bilinear", "bicubic"))
    layer: str = arg("last", "last, all (one probe per ViT block or ResNet stage) or one number")
    n_last_blocks: int = arg(1, "DINO: concatenate the CLS tokens of the last n blocks (ViT-S: 4, "
                                "ViT-B: 1)")
    avgpool_patchtokens: bool = arg(False, "DINO: also concatenate the mean patch token (ViT-B: "
                                           "true)")
    mode: str = arg("fast", "fast (precomputed features) or full (augmented, the papers' "
                            "protocols)", choices=("fast", "full"))
    optimizer: str = arg("sgd", "sgd (momentum 0.9: MoCo v3, DINO) or lars (SimSiam, GSG)",
                         choices=("sgd", "lars"))
    epochs: int = arg(100, "probe epochs (MoCo v3, SimSiam: 90, DINO: 100)")
    batch_size: int = arg(256, "global batch")
    lr: float = arg(0.1, "base lr per 256 images (MoCo v3: 0.1 ResNet, 3.0 ViT; DINO 0.001; "
                         "SimSiam LARS 0.1)")
    weight_decay: float = arg(0.0, "weight decay of the probe")
    num_workers: int = arg(4, "data-loading workers per rank")
    seed: int = arg(0, "seed of the probe's init and shuffling")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    plot: str = arg("", "with --layer all: write the per-layer curve to this PNG")
    json: str = arg("", "also write the results to this JSON file")


def main(argv=None):
    cfg = parse(Config, argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required (a last.pt written by a training script)")
    ctx = dist.setup(cfg.device)
    backbone, train_cfg, which = checkpoint.load_backbone(cfg.checkpoint, cfg.which)
    backbone.to(ctx.device)
    dataset, data_dir = cfg.dataset or train_cfg["dataset"], cfg.data_dir or train_cfg["data_dir"]
    size = cfg.image_size or train_cfg.get("image_size") or data.DEFAULT_IMAGE_SIZE[dataset]
    layers = select_layers(backbone, cfg.layer)
    acc = linear_eval(backbone, dataset, data_dir, size, ctx, cfg, layers,
                      train_cfg.get("class_list", "") if not cfg.dataset else "")
    rows = [{"top-1": a[0], "top-5": a[1]} for a in acc]
    print0(f"linear {cfg.mode} ({cfg.optimizer}, {cfg.epochs} epochs) of {cfg.checkpoint} "
           f"({which}) on {dataset}")
    if layers is None:
        print0(f"linear ({cfg.mode}) top-1 {acc[0][0]:.2f} top-5 {acc[0][1]:.2f}")
    else:
        from eval.layers import report
        report(f"linear {cfg.mode} ({dataset}, {which})", layers, rows, cfg.plot)
    if cfg.json and ctx.is_main:
        with open(cfg.json, "w") as f:
            json.dump({"which": which, "layers": layers, "rows": rows}, f, indent=1)
    dist.cleanup()


if __name__ == "__main__":
    run(main)
