"""k-NN and a linear probe from one pass of frozen features:
how the benchmark tables evaluate a backbone (scripts/run_table.py), with their two baselines, the
same architecture at random init and raw pixels.

    python -m eval.frozen --checkpoint OUT/last.pt --json OUT/eval.json  # a trained backbone
    python -m eval.frozen --arch resnet8 --dataset fashion_mnist \
        --json rand.json                                                 # random init, seed --seed
    python -m eval.frozen --arch pixels --dataset fashion_mnist \
        --json pixels.json                                               # the normalised pixels
    python -m eval.frozen --checkpoint OUT/last.pt --head true  # g(h): the projection head's output
    python -m eval.frozen --checkpoint OUT/last.pt --layer all  # every ViT block / ResNet stage
                                                                # (SDSSL Fig. 3)

The features of the training and test images are extracted once (eval transform, no augmentation):
weighted k-NN on their L2-normalised form (eval/knn.py), and a linear classifier trained on their
standardised form (eval/linear.py fast mode). Prints one line and writes the numbers as JSON.
"""
import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import checkpoint, data, dist, models
from common.checkpoint import WHICH
from common.config import ConfigError, arg, parse, run
from common.log import print0
from eval import linear
from eval.knn import eval_dataset, extract, knn_classify, named, select_layers
from eval.layers import report


class Pixels(nn.Module):
    """The raw-pixel baseline as a 'backbone': the normalised image, flattened."""

    def forward(self, x):
        return x.flatten(1)


@torch.no_grad()
def features_of(backbone, dataset, data_dir, image_size, ctx, download=False, layers=None):
    """([train features per layer], train labels, [test features per layer], test labels, number of
    classes), unnormalised, in dataset order; one feature (the backbone's output) when layers is
    None."""
    backbone.eval()
    splits = [eval_dataset(dataset, data_dir, split, image_size, download)
              for split in ("train", "val")]
    out = [extract(backbone, data.eval_loader(s, 256, ctx, 0), ctx, layers, unit_norm=False)
           for s in splits]
    (train_f, train_y), (test_f, test_y) = out
    return train_f, train_y, test_f, test_y, data.num_classes(splits[0])


def evaluate(backbone, dataset, data_dir, image_size, ctx, ks=(20, 200), temperature=0.07,
             linear_epochs=30, linear_lr=0.1, seed=0, download=False, layers=None):
    """{'knn_top1_k20': ..., 'knn_top5_k20': ..., 'knn_top1_k200': ..., 'linear_top1': ...,
    'linear_top5': ...} in %, the test set counted exactly; with `layers` (eval.knn.select_layers),
    a list of such dicts, one per layer."""
    train_f, train_y, test_f, test_y, num_classes = features_of(backbone, dataset, data_dir,
                                                                image_size, ctx, download, layers)
    results = []
    for train, test in zip(train_f, test_f):
        unit = [torch.nn.functional.normalize(f, dim=1) for f in (train, test)]
        correct = knn_classify(unit[0], train_y, unit[1], test_y, ks, temperature, num_classes)
        results.append(named({k: (100.0 * c / len(test_y)).tolist() for k, c in correct.items()},
                             "knn_top{t}_k{k}"))
    # standardise: a fixed affine map, the probe stays linear; one probe per layer, trained side by
    # side
    mean_std = [(f.mean(0), f.std(0) + 1e-6) for f in train_f]
    torch.manual_seed(seed)
    heads = linear.Heads([nn.Linear(f.shape[1], num_classes) for f in train_f]).to(ctx.device)
    for head in heads:
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    cfg = linear.Config(epochs=linear_epochs, lr=linear_lr, batch_size=256, seed=seed)
    with torch.enable_grad():
        linear.train_fast(heads, [(f - m) / s for f, (m, s) in zip(train_f, mean_std)], train_y,
                          cfg, ctx)
    hits = linear.accuracy(heads, [(f - m) / s for f, (m, s) in zip(test_f, mean_std)], test_y)
    for result, (top1, top5) in zip(results, hits):
        result.update(linear_top1=100.0 * top1 / len(test_y),
                      linear_top5=100.0 * top5 / len(test_y))
    return results if layers is not None else results[0]


@dataclass(frozen=True)
class Config:
    checkpoint: str = arg("", "last.pt of a training script; empty = --arch at random init (or "
                              "pixels)")
    which: str = arg("auto", "weights to evaluate: auto (what the checkpoint's paper evaluates), "
                     "model (online/student) or teacher", choices=WHICH)
    head: bool = arg(False, "probe the projection head's output g(h) instead of the backbone's h "
                            "(SimCLR Fig. 8)")
    arch: str = arg("", "without --checkpoint: an architecture at random init, or pixels")
    patch_size: int = arg(16, "ViT patch size (random init)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (random init)")
    dataset: str = arg("", "labeled dataset; empty = the checkpoint's")
    data_dir: str = arg("", "dataset root; empty = the checkpoint's (./data without a checkpoint)")
    download: bool = arg(False, "download a torchvision dataset if missing")
    image_size: int = arg(0, "evaluated size; 0 = the checkpoint's or the dataset's")
    k: list = arg([20, 200], "numbers of neighbours")
    temperature: float = arg(0.07, "k-NN vote temperature (DINO: 0.07)")
    linear_epochs: int = arg(30, "epochs of the linear probe on the precomputed features")
    linear_lr: float = arg(0.1, "the probe's SGD learning rate per 256 images")
    layer: str = arg("last", "last (the backbone's output), all (every ViT block or ResNet stage) "
                             "or one number")
    seed: int = arg(0, "seed of the random init and of the probe")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    json: str = arg("", "also write the results to this JSON file")


def main(argv=None):
    cfg = parse(Config, argv, description=__doc__.splitlines()[0])
    if cfg.head and not cfg.checkpoint:
        raise ConfigError("--head true probes a trained projection head: it needs --checkpoint")
    ctx = dist.setup(cfg.device)
    if cfg.checkpoint:
        backbone, trained, which = checkpoint.load_backbone(cfg.checkpoint, cfg.which)
        what = f"{cfg.checkpoint} ({which})"
        if cfg.head:
            backbone = nn.Sequential(backbone, checkpoint.load_projector(cfg.checkpoint, which))
            what += ", projection head output"
    elif cfg.arch:
        trained = {"dataset": cfg.dataset, "data_dir": cfg.data_dir or "./data",
                   "image_size": cfg.image_size}
        if not cfg.dataset:
            raise ConfigError("--arch needs --dataset")
        size = cfg.image_size or data.DEFAULT_IMAGE_SIZE[cfg.dataset]
        torch.manual_seed(cfg.seed)
        backbone = Pixels() if cfg.arch == "pixels" else models.build_model(
            cfg.arch, image_size=size, patch_size=cfg.patch_size, num_heads=cfg.num_heads or None)
        what = ("raw pixels" if cfg.arch == "pixels"
                else f"{cfg.arch} at random init (seed {cfg.seed})")
    else:
        raise ConfigError("give --checkpoint (a last.pt of a training script) or --arch (random "
                          "init, or pixels)")
    dataset, data_dir = cfg.dataset or trained["dataset"], cfg.data_dir or trained["data_dir"]
    size = cfg.image_size or trained.get("image_size") or data.DEFAULT_IMAGE_SIZE[dataset]
    layers = select_layers(backbone, cfg.layer) if cfg.layer != "last" else None
    result = evaluate(backbone.to(ctx.device), dataset, data_dir, size, ctx, tuple(cfg.k),
                      cfg.temperature, cfg.linear_epochs, cfg.linear_lr, cfg.seed, cfg.download,
                      layers)
    if layers is None:
        print0(f"{what} on {dataset}: " + " ".join(f"{k} {v:.2f}" for k, v in result.items()))
    else:
        report(f"{what} on {dataset}", layers, result)
        result = {"layers": layers, "rows": result}
    if cfg.json and ctx.is_main:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=1)
    dist.cleanup()


if __name__ == "__main__":
    run(main)
