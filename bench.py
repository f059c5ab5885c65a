"""Benchmark the real training step of any script (nanoGPT's bench.py idea), or the augmentation pipelines.

    python bench.py --script simclr --arch resnet18 --batch_size 256                # training step, CPU or GPU
    python bench.py --script mocov3 --arch vit_small --image_size 224 --batch_size 128 --amp bf16 --mfu
    python bench.py --script simclr --data off ...                                   # loader excluded: step only
    python bench.py --augment --image_size 32 --batch_size 512                       # PIL vs batched views, per core

Training mode runs the script's own main() in this process on `fake` data (random uint8 images held in memory, at
--image_size), for a warm-up epoch and a measured epoch of --steps steps, and prints images/s, peak memory and the
fraction of time spent waiting for data. A second, instrumented run synchronises around every optimizer step to split
the step time into data / forward+backward (everything else in the step) / optimizer. --mfu counts the model FLOPs
of one step with torch.utils.flop_counter and divides the achieved FLOP/s by --peak_tflops. Every flag bench.py does
not know is passed to the script (`--compile true`, `--aug_device gpu`, ...). Checkpoints go to a temporary folder.
Numbers vary with the machine's load: run twice, and compare figures only from the same run or the same idle machine.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import torch

from common import augment, data, optim

SCRIPTS = ("simclr", "mocov3", "byol", "simsiam_gsg", "sdssl", "msbreg", "ifacd_distill")


class RepeatLoader:
    """--data off: the first batch of the real loader, again and again (sampler and length kept for the script)."""

    def __init__(self, loader):
        self.sampler, self.length = loader.sampler, len(loader)
        self.batch = next(iter(loader))

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


def timed_optimizers(records):
    """Wrap common.optim.build_optimizer so every optimizer step is synchronised and timed into `records`."""
    build = optim.build_optimizer

    def build_timed(*args, **kwargs):
        opt = build(*args, **kwargs)
        step = opt.step

        def timed_step(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = step(*a, **k)
            sync()
            records.append(time.perf_counter() - t0)
            return out
        opt.step = timed_step
        return opt
    return build_timed


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_script(module, args, extra, epochs, steps, out):
    """Run module.main() with the benchmark's overrides; returns the last epoch's log.jsonl row."""
    argv = ["--dataset", "fake", "--epochs", str(epochs), "--max_steps_per_epoch", str(steps), "--eval_every", "0",
            "--output_dir", out, "--log_every", "1000000", "--save_every", "0", "--num_workers", "0"]
    if "--image_size" not in extra:
        argv += ["--image_size", str(args.image_size)]
    sys.argv = [module.__name__ + ".py"] + argv + extra  # the script's own flags come last and win
    if os.path.exists(os.path.join(out, "last.pt")):
        os.remove(os.path.join(out, "last.pt"))  # a fresh run, not a resume
    module.main()
    with open(os.path.join(out, "log.jsonl")) as f:
        return json.loads(f.readlines()[-1])


def bench_training(args, extra):
    module = importlib.import_module(args.script)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # Enough fake images for every rank's steps, at the benchmark's resolution.
    data.FAKE_SIZES.update(train=args.steps * args.batch_size, side=args.image_size)
    extra = extra + ["--batch_size", str(args.batch_size)]
    if args.data == "off":
        real = data.train_loader
        data.train_loader = lambda *a, **k: RepeatLoader(real(*a, **k))
    with tempfile.TemporaryDirectory() as out:
        row = run_script(module, args, extra, epochs=2, steps=args.steps, out=out)  # epoch 0 warms up
        records = []
        optim.build_optimizer = timed_optimizers(records)
        split = run_script(module, args, extra, epochs=2, steps=args.steps, out=out)
        flops = count_flops(module, args, extra, out) if args.mfu else None
    step_ms = 1000 * args.batch_size / split["img_per_s"]
    opt_ms = 1000 * sum(records[-args.steps:]) / args.steps
    data_ms = split["data_frac"] * step_ms
    mem = f"peak GPU memory {row['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in row else f"peak RSS {row['peak_rss_gb']:.2f} GB"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.script} {' '.join(extra)} | {world} rank(s), {device}")
    print(f"  {row['img_per_s']:.1f} img/s ({1000 * args.batch_size / row['img_per_s']:.1f} ms/step), "
          f"data wait {100 * row['data_frac']:.1f}%, {mem}")
    print(f"  instrumented step {step_ms:.1f} ms: data {data_ms:.1f} ms | forward+backward {step_ms - data_ms - opt_ms:.1f} ms"
          f" | optimizer {opt_ms:.1f} ms")
    if flops:
        achieved = flops / args.batch_size * row["img_per_s"] / world  # per GPU
        print(f"  model FLOPs {flops / args.batch_size / 1e9:.2f} GFLOP/img (fwd+bwd), {achieved / 1e12:.1f} TFLOP/s per "
              f"device" + (f", MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops} TFLOP/s"
                           if args.peak_tflops else ""))


def count_flops(module, args, extra, out):
    """FLOPs of one training step (forward + backward of everything the step computes), per rank."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run_script(module, args, extra, epochs=1, steps=1, out=out)
    return counter.get_total_flops() * int(os.environ.get("WORLD_SIZE", 1))


def bench_augment(args):
    """Two SimCLR-recipe views per image: torchvision on PIL (as a loader worker does) vs batched tensor ops, one
    thread each, on the same images in the same run. Prints images/s per core."""
    torch.set_num_threads(1)
    recipe = augment.simclr_recipe(args.image_size, strength=0.5, blur=args.image_size > 32)
    data.FAKE_SIZES.update(train=args.batch_size, side=args.image_size)
    images = data.fake_set("train").images  # (B, S, S, 3) uint8
    pil = data.ArrayDataset(images, torch.zeros(len(images)), augment.TwoViews(augment.to_torchvision(recipe)))
    t0 = time.perf_counter()
    for i in range(len(pil)):
        pil[i]
    pil_rate = len(pil) / (time.perf_counter() - t0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = augment.ViewMaker([recipe], 2, device, "gpu", "fake", compiled=args.compiled_hue)
    views(images)  # warm-up (and compilation of the hue op with --compiled_hue)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        views(images)
    sync()
    batched_rate = args.steps * len(images) / (time.perf_counter() - t0)
    print(f"two {args.image_size}px views, SimCLR recipe (s=0.5{', blur' if recipe.blur_p else ', no blur'}), "
          f"batch {len(images)}, one CPU thread:")
    print(f"  torchvision (PIL)       {pil_rate:9.0f} img/s per core")
    print(f"  batched on {device.type:4s}{' (compiled hue)' if args.compiled_hue else '               '}"
          f"{batched_rate:9.0f} img/s ({batched_rate / pil_rate:.1f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", choices=SCRIPTS, help="training script to time")
    parser.add_argument("--augment", action="store_true", help="compare the augmentation pipelines instead")
    parser.add_argument("--batch_size", type=int, default=256, help="global batch")
    parser.add_argument("--image_size", type=int, default=32, help="fake image and crop size")
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (warm-up epoch + measured epoch)")
    parser.add_argument("--data", choices=("on", "off"), default="on", help="off: time the step without the loader")
    parser.add_argument("--mfu", action="store_true", help="count model FLOPs and report FLOP/s (and MFU)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--compiled_hue", action="store_true", help="--augment: torch.compile the hue op")
    args, extra = parser.parse_known_args()
    if args.augment:
        bench_augment(args)
    elif args.script:
        bench_training(args, extra)
    else:
        parser.error("give --script NAME or --augment")


if __name__ == "__main__":
    main()
