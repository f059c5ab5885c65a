"""Weighted k-NN evaluation (Wu et al. 2018, as in DINO's eval_knn.py): cosine similarity, k = 20 and 200, T = 0.07.

As a function, it is the training scripts' monitor (`KNNMonitor`). As a script it evaluates any checkpoint:
    python -m eval.knn --checkpoint OUT/last.pt [--dataset cifar10 --data_dir ./data] [--layer all] [--which teacher]
    torchrun --standalone --nproc_per_node=8 -m eval.knn --checkpoint OUT/last.pt --dataset imagenet --data_dir DIR
Feature extraction is distributed (rank r takes samples r, r+W, ...) and the correct counts are summed over ranks,
so the accuracy is exact: no padded or duplicated samples.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import augment, checkpoint, data, dist
from common.config import ConfigError, arg, parse, run
from common.log import print0


def select_layers(backbone, layer):
    """'' / 'last' -> None (the backbone's output); 'all' -> every ViT block; 'N' -> block N (1-based)."""
    if layer in ("", "last"):
        return None
    if not hasattr(backbone, "forward_intermediates"):
        raise ConfigError("--layer needs a ViT backbone (ResNets have one output)")
    if layer == "all":
        return list(range(1, backbone.depth + 1))
    if not layer.isdigit() or not 1 <= int(layer) <= backbone.depth:
        raise ConfigError(f"--layer must be last, all or a block number 1..{backbone.depth}, got {layer!r}")
    return [int(layer)]


def eval_dataset(name, data_dir, split, image_size, download=False, class_list=""):
    """A labeled split with the evaluation transform. In-memory datasets evaluated at their native size (CIFAR at
    32, STL-10 at 96, Fashion-MNIST at 28) yield uint8 images that `extract` normalises as a batch (augment.to_float:
    the same numbers as eval_transform, without a PIL round trip per image: 70k images in seconds, not a minute)."""
    native = name in augment.IN_MEMORY and image_size == data.DEFAULT_IMAGE_SIZE[name]
    return data.build_dataset(name, data_dir, split, None if native else augment.eval_transform(image_size), download,
                              class_list)


def features(backbone, x, layers=None):
    """[(B, D)] features of a batch: the backbone output, or the normed CLS after each requested block."""
    if layers is None:
        return [backbone(x)]
    _, tokens = backbone.forward_intermediates(x, norm=True)
    return [tokens[l - 1][:, 0] for l in layers]


@torch.no_grad()
def extract(backbone, loader, ctx, layers=None, gather_all=True, unit_norm=True):
    """Features (L2-normalised if unit_norm) and labels of the samples of an eval_loader (items (x, y, index)).
    gather_all: every rank gets all samples in dataset order; otherwise each rank keeps its own shard."""
    feats, labels, index = None, [], []
    for x, y, i in loader:
        x = x.to(ctx.device, non_blocking=True)
        out = features(backbone, augment.to_float(x) if x.dtype == torch.uint8 else x, layers)
        feats = [[] for _ in out] if feats is None else feats
        for store, f in zip(feats, out):
            store.append(F.normalize(f.float(), dim=1) if unit_norm else f.float())
        labels.append(y.to(ctx.device))
        index.append(i.to(ctx.device))
    labels, index = torch.cat(labels), torch.cat(index)
    feats = [torch.cat(f) for f in feats]
    if not gather_all:
        return feats, labels
    order = dist.gather_uneven(index).argsort()  # rank shards interleave; sort back to dataset order
    return [dist.gather_uneven(f)[order] for f in feats], dist.gather_uneven(labels)[order]


def knn_classify(train_f, train_y, test_f, test_y, ks=(20, 200), temperature=0.07, num_classes=None, chunk=256):
    """Weighted k-NN votes: each of the k nearest training samples votes for its class with weight exp(sim / T).
    Features must be L2-normalised. Returns {k: number of correct test predictions} (a tensor each)."""
    num_classes = num_classes or int(train_y.max()) + 1
    k_max = min(max(ks), train_f.shape[0])
    correct = {k: torch.zeros((), device=test_f.device) for k in ks}
    for start in range(0, test_f.shape[0], max(1, chunk)):
        sim = test_f[start:start + chunk] @ train_f.T  # (b, N_train)
        top_sim, top_idx = sim.topk(k_max, dim=1)  # (b, k)
        votes = F.one_hot(train_y[top_idx], num_classes).float() * (top_sim / temperature).exp()[..., None]
        y = test_y[start:start + chunk]
        for k in ks:
            pred = votes[:, :min(k, k_max)].sum(dim=1).argmax(dim=1)
            correct[k] += (pred == y).sum()
    return correct


class KNNMonitor:
    """Builds the labeled train / val loaders once; `evaluate(backbone)` returns {k: top-1 %} (per layer if asked).
    bank_size > 0 keeps that many training images, evenly spaced, as the neighbours (a cheaper training-time curve)."""

    def __init__(self, dataset, data_dir, image_size, ctx, batch_size=256, num_workers=4, download=False,
                 class_list="", bank_size=0):
        train = eval_dataset(dataset, data_dir, "train", image_size, download, class_list)
        val = eval_dataset(dataset, data_dir, "val", image_size, download, class_list)
        self.num_classes = data.num_classes(train)
        if 0 < bank_size < len(train):
            train = torch.utils.data.Subset(train, range(0, len(train), -(-len(train) // bank_size)))
        self.ctx = ctx
        self.train = data.eval_loader(train, batch_size, ctx, num_workers)
        self.val = data.eval_loader(val, batch_size, ctx, num_workers)
        self.num_val = len(val)

    @staticmethod
    def due(epoch, epochs, every):
        """The training scripts' monitor runs every `every` epochs and after the last one."""
        return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)

    def log_row(self, backbone, ks=(20, 200), temperature=0.07):
        """{'knn_top1': 20-NN top-1, 'knn_top1_k{k}': ... for every k} for log.jsonl."""
        acc = self.evaluate(backbone, ks, temperature)
        return {"knn_top1": acc[20], **{f"knn_top1_k{k}": a for k, a in acc.items()}}

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
            results.append({k: 100.0 * float(dist.all_reduce_sum(c)) / self.num_val for k, c in correct.items()})
        return results if layers is not None else results[0]


@dataclass(frozen=True)
class Config:
    checkpoint: str = arg("", "last.pt of any training script (required)")
    which: str = arg("model", "weights to evaluate: model (online/student) or teacher", choices=("model", "teacher"))
    dataset: str = arg("", "labeled dataset; empty = the checkpoint's")
    data_dir: str = arg("", "dataset root; empty = the checkpoint's")
    download: bool = arg(False, "download a torchvision dataset if missing")
    image_size: int = arg(0, "eval crop size; 0 = the checkpoint's")
    layer: str = arg("last", "last, all (every ViT block: a table and a plot) or a block number 1..depth")
    k: list = arg([20, 200], "numbers of neighbours")
    temperature: float = arg(0.07, "vote temperature (DINO: 0.07)")
    batch_size: int = arg(256, "per-rank batch for feature extraction")
    num_workers: int = arg(4, "data-loading workers per rank")
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
    monitor = KNNMonitor(dataset, data_dir, size, ctx, cfg.batch_size, cfg.num_workers, cfg.download,
                         train_cfg.get("class_list", "") if not cfg.dataset else "")
    results = monitor.evaluate(backbone, tuple(cfg.k), cfg.temperature, layers)
    if layers is None:
        print0(" ".join(f"{k}-NN top-1 {acc:.2f}" for k, acc in results.items()))
    else:
        from eval.layers import report
        report(f"k-NN ({dataset}, {cfg.which})", layers, [{f"{k}-NN": acc for k, acc in r.items()} for r in results],
               cfg.plot)
    dist.cleanup()


if __name__ == "__main__":
    run(main)
