"""Weighted k-NN evaluation (Wu et al. 2018, as in DINO's eval_knn.py):
cosine similarity, k = 20 and 200, T = 0.07.

As a function, it is the training scripts' monitor (`KNNMonitor`). As a script it evaluates any
checkpoint:
    python -m eval.knn --checkpoint OUT/last.pt [--dataset cifar10 --data_dir ./data] \
        [--layer all] [--which teacher]
    python -m eval.knn --config configs/eval/knn_gsg.yaml \
        --checkpoint OUT/last.pt                                    # a paper's protocol
    torchrun --standalone --nproc_per_node=8 -m eval.knn --checkpoint OUT/last.pt \
        --dataset imagenet --data_dir DIR
Feature extraction is distributed (rank r takes samples r, r+W, ...) and the correct counts are
summed over ranks, so the accuracy is exact: no padded or duplicated samples. Top-1 and top-5 for
every k.
`--which auto` (the default) evaluates the network the checkpoint's paper evaluates (the EMA teacher
of SD-MoCo v3 and SD-BYOL, the online / student network everywhere else); `--layer all` gives every
ViT block or ResNet stage.
The papers' protocols, as YAML files in configs/eval/: DINO (k 20, T 0.07; knn_dino.yaml), GSG (k
200, T 0.2, square resize to 256 then centre crop 224; knn_gsg.yaml), lightly's CIFAR benchmark (k
200, T 0.1; knn_lightly_cifar.yaml), MSBReg's 5-NN (knn_msbreg.yaml).
"""
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import augment, checkpoint, cifar_models, data, dist
from common.checkpoint import WHICH
from common.config import ConfigError, arg, parse, run
from common.log import print0


def num_layers(backbone):
    """How many layers `--layer` can pick from: the ViT's blocks, or the stages of a ResNet
    (torchvision: 4) or of a CIFAR-zoo model (its Features.stages after the stem: resnet / wrn /
    ShuffleNets 3, VGG / ResNet50 / MobileNetV2 4)."""
    if hasattr(backbone, "forward_intermediates"):
        return backbone.depth
    if hasattr(backbone, "forward_stages"):
        return 4
    if isinstance(backbone, tuple(cls for cls, _ in cifar_models.CIFAR_MODELS.values())):
        return len(cifar_models.feature_shapes(backbone).stages) - 1
    raise ConfigError(f"--layer needs a ViT or a ResNet backbone, not {type(backbone).__name__}")


def select_layers(backbone, layer):
    """'' / 'last' -> None (the backbone's output); 'all' -> every block (ViT) or stage (ResNet);
    'N' -> that one (1-based)."""
    if layer in ("", "last"):
        return None
    depth = num_layers(backbone)
    if layer == "all":
        return list(range(1, depth + 1))
    if not layer.isdigit() or not 1 <= int(layer) <= depth:
        raise ConfigError(f"--layer must be last, all or a block/stage number 1..{depth}, got "
                          f"{layer!r}")
    return [int(layer)]


def eval_dataset(name, data_dir, split, image_size, download=False, class_list="", resize="short",
                 interpolation="bilinear"):
    """A labeled split with the evaluation transform. In-memory datasets evaluated at their native
    size (CIFAR at 32, STL-10 at 96, Fashion-MNIST at 28) yield uint8 images that `extract`
    normalises as a batch (augment.to_float: the same numbers as eval_transform, without a PIL
    round trip per image: 70k images in seconds, not a minute)."""
    native = name in augment.IN_MEMORY and image_size == data.DEFAULT_IMAGE_SIZE[name]
    transform = None if native else augment.eval_transform(image_size, resize=resize,
                                                           interpolation=interpolation)
    return data.build_dataset(name, data_dir, split, transform, download, class_list)


def features(backbone, x, layers=None, n_last_blocks=1, avgpool_patchtokens=False):
    """[(B, D_l)] features of a batch: the backbone output; or, for each requested layer l, the
    normed CLS after ViT block l (SDSSL's layer representation) or the average-pooled output of
    ResNet stage l (SDSSL Table 7, MSBReg Table 12). DINO's linear protocol (n_last_blocks > 1 or
    avgpool_patchtokens, ViT only): one feature, the normed CLS tokens of the last n blocks
    concatenated, then the mean normed patch token of the last block."""
    if n_last_blocks > 1 or avgpool_patchtokens:
        _, tokens = backbone.forward_intermediates(x, norm=True)
        out = [t[:, 0] for t in tokens[-n_last_blocks:]]
        return [torch.cat(out + ([tokens[-1][:, 1:].mean(1)] if avgpool_patchtokens else []),
                          dim=1)]
    if layers is None:
        return [backbone(x)]
    if hasattr(backbone, "forward_intermediates"):
        _, tokens = backbone.forward_intermediates(x, norm=True)
        return [tokens[l - 1][:, 0] for l in layers]
    maps = (backbone.forward_stages(x) if hasattr(backbone, "forward_stages")
            else backbone(x, features=True).stages[1:])
    return [maps[l - 1].mean((2, 3)) for l in layers]


@torch.no_grad()
def feature_dims(backbone, image_size, layers=None, n_last_blocks=1, avgpool_patchtokens=False):
    """The width of each feature `features` returns (a probe forward of two blank images, BN
    statistics kept)."""
    mode = backbone.training
    p = next(backbone.parameters())
    x = torch.zeros(2, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    dims = [f.shape[1]
            for f in features(backbone.eval(), x, layers, n_last_blocks, avgpool_patchtokens)]
    backbone.train(mode)
    return dims


@torch.no_grad()
def extract(backbone, loader, ctx, layers=None, gather_all=True, unit_norm=True, **protocol):
    """Features (L2-normalised if unit_norm) and labels of the samples of an eval_loader
    (items (x, y, index)).
    gather_all: every rank gets all samples in dataset order; otherwise each rank keeps its own
    shard.
    protocol: n_last_blocks / avgpool_patchtokens of `features` (DINO's linear protocol)."""
    feats, labels, index = None, [], []
    for x, y, i in loader:
        x = x.to(ctx.device, non_blocking=True)
        out = features(backbone, augment.to_float(x) if x.dtype == torch.uint8 else x, layers,
                       **protocol)
        feats = [[] for _ in out] if feats is None else feats
        for store, f in zip(feats, out):
            store.append(F.normalize(f.float(), dim=1) if unit_norm else f.float())
        labels.append(y.to(ctx.device))
        index.append(i.to(ctx.device))
    labels, index = torch.cat(labels), torch.cat(index)
    feats = [torch.cat(f) for f in feats]
    if not gather_all:
        return feats, labels
    # rank shards interleave; sort back to dataset order
    order = dist.gather_uneven(index).argsort()
    return [dist.gather_uneven(f)[order] for f in feats], dist.gather_uneven(labels)[order]


def knn_classify(train_f, train_y, test_f, test_y, ks=(20, 200), temperature=0.07, num_classes=None,
                 chunk=256):
    """Weighted k-NN votes: each of the k nearest training samples votes for its class with weight
    exp(sim / T).
    Features must be L2-normalised. Returns {k: tensor([top-1 correct, top-5 correct])}: the number
    of test samples whose class gets the most votes, or is among the five classes with the most."""
    num_classes = num_classes or int(train_y.max()) + 1
    k_max = min(max(ks), train_f.shape[0])
    correct = {k: torch.zeros(2, device=test_f.device) for k in ks}
    for start in range(0, test_f.shape[0], max(1, chunk)):
        sim = test_f[start:start + chunk] @ train_f.T  # (b, N_train)
        top_sim, top_idx = sim.topk(k_max, dim=1)  # (b, k)
        votes = (F.one_hot(train_y[top_idx], num_classes).float()
                 * (top_sim / temperature).exp()[..., None])
        y = test_y[start:start + chunk]
        for k in ks:
            # (b, 5), best first
            pred = votes[:, :min(k, k_max)].sum(dim=1).topk(min(5, num_classes), dim=1).indices
            hit = pred == y[:, None]
            correct[k] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
    return correct


def named(results, pattern):
    """{k: (top-1, top-5)} -> {pattern with t=1 and k: top-1, ... t=5 ...: top-5}, e.g.
    'knn_top{t}_k{k}'."""
    return {pattern.format(t=t, k=k): acc[i] for k, acc in results.items()
            for i, t in enumerate((1, 5))}


class KNNMonitor:
    """Builds the labeled train / val loaders once; `evaluate(backbone)` returns
    {k: (top-1 %, top-5 %)} (per layer if asked). bank_size > 0 keeps that many training images,
    evenly spaced, as the neighbours (a cheaper training-time curve). resize / interpolation: see
    augment.eval_transform."""

    def __init__(self, dataset, data_dir, image_size, ctx, batch_size=256, num_workers=4,
                 download=False, class_list="", bank_size=0, resize="short",
                 interpolation="bilinear"):
        train, val = (eval_dataset(dataset, data_dir, split, image_size, download, class_list,
                                   resize, interpolation)
                      for split in ("train", "val"))
        self.num_classes = data.num_classes(train)
        if 0 < bank_size < len(train):
            train = torch.utils.data.Subset(train, [i * len(train) // bank_size
                                                    for i in range(bank_size)])
        self.ctx = ctx
        self.train = data.eval_loader(train, batch_size, ctx, num_workers)
        self.val = data.eval_loader(val, batch_size, ctx, num_workers)
        self.num_val = len(val)

    @staticmethod
    def due(epoch, epochs, every):
        """The training scripts' monitor runs every `every` epochs and after the last one."""
        return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)

    def log_row(self, backbone, ks=(20, 200), temperature=0.07):
        """{'knn_top1': 20-NN top-1, 'knn_top1_k{k}', 'knn_top5_k{k}': ... for every k} for
        log.jsonl."""
        acc = self.evaluate(backbone, ks, temperature)
        return {"knn_top1": acc[20][0], **named(acc, "knn_top{t}_k{k}")}

    @torch.no_grad()
    def evaluate(self, backbone, ks=(20, 200), temperature=0.07, layers=None):
        was_training = backbone.training
        backbone.eval()
        train_f, train_y = extract(backbone, self.train, self.ctx, layers)
        val_f, val_y = extract(backbone, self.val, self.ctx, layers, gather_all=False)
        backbone.train(was_training)
        results = []
        for tf, vf in zip(train_f, val_f):
            correct = knn_classify(tf, train_y, vf, val_y, ks, temperature, self.num_classes)
            results.append({k: tuple((100.0 * dist.all_reduce_sum(c) / self.num_val).tolist())
                            for k, c in correct.items()})
        return results if layers is not None else results[0]


@dataclass(frozen=True)
class Config:
    config: str = arg("", "a protocol YAML (configs/eval/knn_*.yaml); flags override it")
    checkpoint: str = arg("", "last.pt of any training script (required)")
    which: str = arg("auto", "weights to evaluate: auto (what the checkpoint's paper evaluates), "
                     "model (online/student) or teacher", choices=WHICH)
    dataset: str = arg("", "labeled dataset; empty = the checkpoint's")
    data_dir: str = arg("", "dataset root; empty = the checkpoint's")
    download: bool = arg(False, "download a torchvision dataset if missing")
    image_size: int = arg(0, "eval crop size; 0 = the checkpoint's")
    resize: str = arg("short", "before the centre crop, resize the short side (short) or both "
                               "sides (square, GSG) to image_size / 0.875",
                      choices=("short", "square"))
    interpolation: str = arg("bilinear", "resize interpolation", choices=("bilinear", "bicubic"))
    layer: str = arg("last", "last, all (every ViT block or ResNet stage: a table and a plot) or "
                             "one number")
    k: list = arg([20, 200], "numbers of neighbours")
    temperature: float = arg(0.07, "vote temperature (DINO: 0.07)")
    batch_size: int = arg(256, "per-rank batch for feature extraction")
    num_workers: int = arg(4, "data-loading workers per rank")
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
    monitor = KNNMonitor(dataset, data_dir, size, ctx, cfg.batch_size, cfg.num_workers,
                         cfg.download, train_cfg.get("class_list", "") if not cfg.dataset else "",
                         0, cfg.resize, cfg.interpolation)
    results = monitor.evaluate(backbone, tuple(cfg.k), cfg.temperature, layers)
    rows = [named(r, "{k}-NN top-{t}") for r in (results if layers else [results])]
    print0(f"k-NN (T {cfg.temperature}) of {cfg.checkpoint} ({which}) on {dataset}")
    if layers is None:
        print0(" ".join(f"{name} {acc:.2f}" for name, acc in rows[0].items()))
    else:
        from eval.layers import report
        report(f"k-NN ({dataset}, {which})", layers, rows, cfg.plot)
    if cfg.json and ctx.is_main:
        with open(cfg.json, "w") as f:
            json.dump({"which": which, "layers": layers, "rows": rows}, f, indent=1)
    dist.cleanup()


if __name__ == "__main__":
    run(main)
