"""Benchmark the real training step of any script (nanoGPT's bench.py idea),
or the augmentation pipelines.

    python bench.py --script simclr --arch resnet18 --batch_size 256  # training step, CPU or GPU
    python bench.py --script mocov3 --arch vit_small --image_size 224 --batch_size 128 --amp bf16 \
        --mfu
    python bench.py --script simclr --data off ...                    # loader excluded: step only
    python bench.py --augment --image_size 32 --batch_size 512      # PIL vs batched views, per core
    python bench.py --script sdssl --arch vit_small --image_size 224 --batch_size 16 \
        --compare "--alpha_max 0 --pred_loss false" --repeat 3
        # plain (the --compare flags) vs SD, alternating runs, prints the ratio

Training mode runs the script's own main() in this process on `fake` data (random uint8 images held
in memory, at --image_size), for a warm-up epoch and a measured epoch of --steps steps, and prints
images/s, peak memory and the fraction of time spent waiting for data. A second, instrumented run
synchronises around every optimizer step to split the step time into data / forward+backward
(everything else in the step) / optimizer. --mfu counts the model FLOPs of one step with
torch.utils.flop_counter and divides the achieved FLOP/s by --peak_tflops. Every flag bench.py does
not know is passed to the script (`--compile true`, `--aug_device gpu`, ...). Checkpoints go to a
temporary folder.
Numbers vary with the machine's load: run twice, and compare figures only from the same run or the
same idle machine.
On the CPU, bench.py asks glibc to keep freed memory (see keep_freed_memory; --keep_freed_memory
false to measure without): allocation costs otherwise blur small differences between configurations.
"""
import argparse
import ctypes
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time

import torch

from common import augment, batch_augment, data, optim

SCRIPTS = ("simclr", "mocov3", "byol", "simsiam_gsg", "sdssl", "msbreg", "ifacd_distill")


class RepeatLoader:
    """--data off: the first batch of the real loader, again and again (sampler and length kept for
    the script)."""

    def __init__(self, loader):
        self.sampler, self.length = loader.sampler, len(loader)
        self.batch = next(iter(loader))

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


def timed_optimizers(records):
    """Wrap common.optim.build_optimizer so every optimizer step is synchronised and timed into
    `records`."""
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


def keep_freed_memory():
    """On the CPU, glibc returns every large freed tensor to the OS and the next step page-faults it
    back in, which slows down the steps that allocate most (about 5% on a ViT-S step here). CUDA's
    caching allocator keeps freed blocks; this asks glibc to do the same (mallopt: no mmap
    threshold, no trimming). No-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # mallopt takes a C int: 2**31 - 1 is the largest trim threshold (a larger Python int wraps
        # around to 0, which would trim on every free).
        ok = libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
        return bool(ok)
    except OSError:
        return False


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_script(module, args, extra, epochs, steps, out):
    """Run module.main() with the benchmark's overrides; returns the last epoch's log.jsonl row."""
    overrides = dict(dataset="fake", epochs=epochs, max_steps_per_epoch=steps, eval_every=0,
                     output_dir=out, log_every=1000000, save_every=0, num_workers=0,
                     image_size=args.image_size)
    # ifacd_distill.py has no image_size, say
    known = {f.name for f in dataclasses.fields(module.Config)}
    argv = [a for k, v in overrides.items() if k in known and f"--{k}" not in extra
            for a in (f"--{k}", str(v))]
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
        # epoch 0 warms up
        row = run_script(module, args, extra, epochs=2, steps=args.steps, out=out)
        records = []
        optim.build_optimizer = timed_optimizers(records)
        split = run_script(module, args, extra, epochs=2, steps=args.steps, out=out)
        flops = count_flops(module, args, extra, out) if args.mfu else None
    step_ms = 1000 * args.batch_size / split["img_per_s"]
    opt_ms = 1000 * sum(records[-args.steps:]) / args.steps
    data_ms = split["data_frac"] * step_ms
    mem = (f"peak GPU memory {row['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in row
           else f"peak RSS {row['peak_rss_gb']:.2f} GB")
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({torch.get_num_threads()} threads)")
    print(f"\n{args.script} {' '.join(extra)} | {world} rank(s), {device}")
    print(f"  {row['img_per_s']:.1f} img/s ({1000 * args.batch_size / row['img_per_s']:.1f} "
          f"ms/step), data wait {100 * row['data_frac']:.1f}%, {mem}")
    print(f"  instrumented step {step_ms:.1f} ms: data {data_ms:.1f} ms | forward+backward "
          f"{step_ms - data_ms - opt_ms:.1f} ms | optimizer {opt_ms:.1f} ms")
    if flops:
        achieved = flops / args.batch_size * row["img_per_s"] / world  # per GPU
        mfu = f", MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}%" if args.peak_tflops else ""
        print(f"  model FLOPs {flops / args.batch_size / 1e9:.2f} GFLOP/img (fwd+bwd), "
              f"{achieved / 1e12:.1f} TFLOP/s per device{mfu}")


def bench_compare(args, extra):
    """Step time of the script's flags vs the same flags + --compare, in alternating runs (so load
    drift on a shared machine hits both alike); prints the medians and the ratio."""
    module = importlib.import_module(args.script)
    data.FAKE_SIZES.update(train=args.steps * args.batch_size, side=args.image_size)
    base = extra + ["--batch_size", str(args.batch_size)]
    variants = {"base": base, "compare": base + args.compare.split()}
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeat):
            for name, flags in variants.items():
                row = run_script(module, args, flags, epochs=2, steps=args.steps, out=out)
                times[name].append(1000 * args.batch_size / row["img_per_s"])
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"\n{args.script} {' '.join(base)}: step time, median of {args.repeat} alternating runs "
          f"of {args.steps} steps")
    for name, flags in variants.items():
        print(f"  {name:8s} {med[name]:8.1f} ms  "
              f"(runs: {', '.join(f'{t:.0f}' for t in times[name])})"
              + (f"  [{args.compare}]" if name == "compare" else ""))
    print(f"  ratio compare / base: {med['compare'] / med['base']:.3f}")


def count_flops(module, args, extra, out):
    """FLOPs of one training step (forward + backward of everything the step computes), per rank."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run_script(module, args, extra, epochs=1, steps=1, out=out)
    return counter.get_total_flops() * int(os.environ.get("WORLD_SIZE", 1))


AUGMENT_MIN_IMAGES = 1024  # bench_augment times each path over at least this many images


def bench_augment(args):
    """Two SimCLR-recipe views per image: torchvision on PIL (as a loader worker does) vs batched
    tensor ops, one thread each, on the same images in the same run. On the CPU the batched path is
    timed twice: as it runs there (each step only on the images drawn for it) and as it runs on a
    GPU (every op on every image, no host synchronisation; batch_augment.CPU_SUBSETS off). Each is
    warmed up, timed over at least 1024 images, and repeated five times in turn; the best of each
    is printed (images/s per core)."""
    torch.set_num_threads(1)
    recipe = augment.simclr_recipe(args.image_size, strength=0.5, blur=args.image_size > 32)
    data.FAKE_SIZES.update(train=args.batch_size, side=args.image_size)
    images = data.fake_set("train").images  # (B, S, S, 3) uint8
    pil = data.ArrayDataset(images, torch.zeros(len(images)),
                            augment.TwoViews(augment.to_torchvision(recipe)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = augment.ViewMaker([recipe], 2, device, "gpu", "fake", compiled=args.compiled_hue)
    n_pil = max(AUGMENT_MIN_IMAGES, len(images))
    calls = max(args.steps, -(-AUGMENT_MIN_IMAGES // len(images)))

    def time_pil():
        t0 = time.perf_counter()
        for i in range(n_pil):
            pil[i % len(pil)]
        return n_pil / (time.perf_counter() - t0)

    def time_batched(subsets=True):
        keep, batch_augment.CPU_SUBSETS = batch_augment.CPU_SUBSETS, subsets
        try:
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                views(images)
            sync()
            return calls * len(images) / (time.perf_counter() - t0)
        finally:
            batch_augment.CPU_SUBSETS = keep

    paths = {"torchvision (PIL)": time_pil, f"batched on {device.type}": time_batched}
    if device.type == "cpu":
        paths["batched, the GPU's path"] = lambda: time_batched(subsets=False)
    for time_path in paths.values():  # warm-up (and compilation of the hue op with --compiled_hue)
        time_path()
    rates = {name: 0.0 for name in paths}
    for _ in range(5):  # in turn
        for name, time_path in paths.items():
            rates[name] = max(rates[name], time_path())
    print(f"two {args.image_size}px views, SimCLR recipe "
          f"(s=0.5{', blur' if recipe.blur_p else ', no blur'}), batch {len(images)}, one CPU "
          f"thread, best of 5{', compiled hue' if args.compiled_hue else ''}:")
    pil_rate = rates.pop("torchvision (PIL)")
    print(f"  {'torchvision (PIL)':26s}{pil_rate:9.0f} img/s per core")
    for name, rate in rates.items():
        print(f"  {name:26s}{rate:9.0f} img/s ({rate / pil_rate:.1f}x)")


def parse_args(argv=None):
    """bench.py's own flags, and the rest (`extra`) for the script, in their order. No
    abbreviations: argparse would otherwise take a script's `--compile true` as a prefix of
    --compiled_hue and `--aug byol` as --augment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--script", choices=SCRIPTS, help="training script to time")
    parser.add_argument("--augment", action="store_true",
                        help="compare the augmentation pipelines instead")
    parser.add_argument("--batch_size", type=int, default=256, help="global batch")
    parser.add_argument("--image_size", type=int, default=32, help="fake image and crop size")
    parser.add_argument("--steps", type=int, default=10,
                        help="steps per epoch (warm-up epoch + measured epoch)")
    parser.add_argument("--data", choices=("on", "off"), default="on",
                        help="off: time the step without the loader")
    parser.add_argument("--mfu", action="store_true",
                        help="count model FLOPs and report FLOP/s (and MFU)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--compiled_hue", action="store_true",
                        help="--augment: torch.compile the hue op")
    parser.add_argument("--compare", default="",
                        help="extra script flags for a second configuration, timed in alternating "
                             "runs against the first (prints the ratio)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="--compare: alternating runs per configuration")
    parser.add_argument("--keep_freed_memory", default="true", choices=("true", "false"),
                        help="CPU: keep freed memory in the process (glibc mallopt) as CUDA's "
                             "allocator does")
    args, extra = parser.parse_known_args(argv)
    return parser, args, extra


def main():
    parser, args, extra = parse_args()
    if args.keep_freed_memory == "true" and not torch.cuda.is_available():
        print(f"glibc keeps freed memory (mallopt): {keep_freed_memory()}")
    if args.augment:
        bench_augment(args)
    elif args.script and args.compare:
        bench_compare(args, extra)
    elif args.script:
        bench_training(args, extra)
    else:
        parser.error("give --script NAME or --augment")


if __name__ == "__main__":
    main()
