"""Which way a SimSiam network collapses (claim 1's diagnostic in docs/claims.md). For each
simsiam_gsg.py checkpoint, on a few batches of training views (the run's own recipe, BatchNorm in
training mode, as the loss sees them):

- out_std: the std over the batch of each channel of z/|z|, averaged over channels (SimSiam
  Fig. 2's monitor, common.log.output_std): 1/sqrt(D) when z spreads over the sphere, 0 when every
  z is the same vector;
- pre_bn_var: the variance over the batch of each channel entering the projector's affine-free
  BatchNorm (median over channels). That BatchNorm gives every channel of z zero mean and unit
  variance, so z can become one constant vector only when this falls below its eps (1e-5);
- top1_share and effective_rank: the share of the variance of z/|z| along its first principal
  direction, and exp of the entropy of its normalised singular values (Roy & Vetterli, 2007):
  how many directions z still spreads over (common.log.output_spectrum, which every SSL script
  logs per epoch as out_top1 and out_rank). A collapse to one direction (z = s u, a number s per
  image) keeps unit variance in every channel, and out_std at 1/sqrt(D) when s is above its batch
  mean for half the images, but not these;
- h_top1_share and h_effective_rank: the same for h/|h|, the backbone's features, which k-NN and
  the linear probe read.

    python scripts/collapse_probe.py OUT/c1c/no_stop_grad/seed0/last.pt ... [--json FILE]

Only data sets held in memory (CIFAR, STL-10, Fashion-MNIST, MNIST, fake); the checkpoint's
data_dir unless --data_dir is given.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import simsiam_gsg  # noqa: E402
from common import augment, checkpoint, data, log  # noqa: E402
from common.config import ConfigError, run  # noqa: E402


def probe(path, data_dir=None, batches=4, batch_size=256, seed=0):
    blob = checkpoint.load(path)
    model_keys = blob.get("model", {})
    if "base" not in blob["config"] or not any(k.startswith("predictor.") for k in model_keys):
        raise ConfigError(f"{path} is not a simsiam_gsg.py checkpoint: collapse_probe reads "
                          f"SimSiam (and BYOL / GSG) runs")
    known = simsiam_gsg.Config.__dataclass_fields__
    cfg = simsiam_gsg.Config(**{k: v for k, v in blob["config"].items() if k in known})
    dataset = data.build_dataset(cfg.dataset, data_dir or cfg.data_dir, "pretrain", None)
    if not isinstance(dataset, data.ArrayDataset):
        raise ConfigError(f"{cfg.dataset} is not held in memory; collapse_probe reads CIFAR, "
                          f"STL-10, Fashion-MNIST, MNIST or fake")
    size = data.image_size(cfg)
    model = simsiam_gsg.build_model(cfg, size)
    model.load_state_dict(blob["model"])
    model.train()  # BatchNorm on the batch's statistics, as in training (nothing is updated)
    recipe = simsiam_gsg.view_recipes(cfg, size)[0]
    pre, hs, zs = [], [], []
    hook = model.projector[-2].register_forward_hook(lambda m, i, o: pre.append(o))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(batches):
            rows = torch.randint(0, len(dataset), (batch_size,), generator=g)
            hs.append(model.backbone(augment.augment_batch(dataset.images[rows], recipe)))
            zs.append(model.projector(hs[-1]))
    hook.remove()
    z, h = torch.cat(zs), torch.cat(hs)
    z_spectrum, h_spectrum = log.output_spectrum(z), log.output_spectrum(h)
    return dict(checkpoint=path, step=blob.get("step"),
                out_std=sum(log.output_std(zb).item() for zb in zs) / len(zs),
                pre_bn_var=torch.stack([p.var(0, unbiased=False) for p in pre]).median().item(),
                top1_share=z_spectrum["out_top1"], effective_rank=z_spectrum["out_rank"],
                dim=z.shape[1], h_top1_share=h_spectrum["out_top1"],
                h_effective_rank=h_spectrum["out_rank"], h_dim=h.shape[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoints", nargs="+", help="simsiam_gsg.py checkpoints (last.pt)")
    parser.add_argument("--data_dir", default=None, help="default: the checkpoint's")
    parser.add_argument("--batches", type=int, default=4, help="batches of 256 views")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for path in args.checkpoints:
        r = probe(path, args.data_dir, args.batches)
        rows.append(r)
        print(f"{path}: step {r['step']}, out_std {r['out_std']:.4f}, pre-BN variance "
              f"{r['pre_bn_var']:.3g} (BN eps 1e-5), top-1 share {r['top1_share']:.3f}, "
              f"effective rank {r['effective_rank']:.1f} of {r['dim']}; backbone: top-1 share "
              f"{r['h_top1_share']:.3f}, effective rank {r['h_effective_rank']:.1f} of "
              f"{r['h_dim']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    run(main)
