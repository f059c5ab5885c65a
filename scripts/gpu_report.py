"""The first minutes on a GPU: every number the README's GPU section waits for, from one command.

    python scripts/gpu_report.py --out docs/gpu           # one GPU, about 8 minutes, no download
    python scripts/gpu_report.py --out /tmp/gpu --tiny    # the same checks at toy sizes (CPU test)

Writes OUT/report.md and OUT/report.json with, each section timed and never stopping the others:
1. the device and the versions (torch, CUDA, cuDNN, driver memory, git commit);
2. SimCLR ResNet-18 at CIFAR-10 size (32 px, batch 512, bf16): step time, images/s, seconds per
   50k-image epoch, FLOPs per image and MFU (--peak_tflops, or the device's bf16 peak from PEAK),
   eager and compiled (torch.compile; its graph breaks are listed);
3. a 3-step smoke run, in bf16, of every script and every distillation method (init stages
included); 4. resume on the device: 2 epochs straight vs 1 + 1 resumed, the largest weight
difference (bit-exact
   on the CPU; cuDNN and atomics may leave ~1e-6 on a GPU);
5. the batched augmentation on the device vs torchvision on one CPU core: images/s, and the output
   statistics of both on the same images;
6. SD-MoCo v3 / MoCo v3 step time on ViT-S/16 at 224 px (SDSSL's cost);
7. bf16 vs fp32: the first-step loss of every SSL script in both;
8. host synchronisations: the training steps under torch.cuda.set_sync_debug_mode("warn").
Everything runs in this process on `fake` images held in memory. --tiny uses toy sizes (resnet8,
vit_debug, batch 16), smokes TINY_CASES only and skips torch.compile: the CPU test runs it in
about 10 s.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after the repository is on the path)

import bench  # noqa: E402
from common import augment, data  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # bf16 dense


def quiet(fn, *args, **kwargs):
    """fn's result, its printed lines kept out of the report's console (they go to the log)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def run(script, flags, out, steps=3, epochs=1):
    """One in-process run of a script on fake data; returns its last log.jsonl row."""
    module = importlib.import_module(script)
    args = argparse.Namespace(image_size=flags.pop("image_size", 32))
    extra = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    row, _ = quiet(bench.run_script, module, args, extra, epochs=epochs, steps=steps, out=out)
    return row


def environment():
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(memory_gb=round(props.total_memory / 2**30, 1),
                   sm=f"{props.major}.{props.minor}",
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    env["git"] = git.stdout.strip() or "unknown"
    return env


def simclr_step(cfg):
    """SimCLR ResNet-18 at 32 px: eager and compiled step time, img/s, s/epoch, FLOPs and MFU."""
    module = importlib.import_module("simclr")
    args = argparse.Namespace(image_size=cfg["size"])
    extra = ["--arch", cfg["arch"], "--amp", "bf16", "--aug_device", "gpu",
             "--batch_size", str(cfg["batch"])]
    data.FAKE_SIZES.update(train=cfg["batch"] * cfg["steps"], side=cfg["size"])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        flops, _ = quiet(bench.count_flops, module, args, extra, tmp)
        for mode in ["eager"] + ([] if cfg["tiny"] else ["compiled"]):
            if mode == "compiled":
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
            flags = extra + (["--compile", "true"] if mode == "compiled" else [])
            row, _ = quiet(bench.run_script, module, args, flags, epochs=2, steps=cfg["steps"],
                           out=tmp)
            ips = row["img_per_s"]  # the second epoch's: the first one warms up (and compiles)
            achieved = flops / cfg["batch"] * ips
            out[mode] = {"img_per_s": round(ips, 1),
                         "ms_per_step": round(1000 * cfg["batch"] / ips, 2),
                         "s_per_epoch_50k": round(50000 / ips, 1),
                         "gflop_per_img": round(flops / cfg["batch"] / 1e9, 3),
                         "tflops": round(achieved / 1e12, 2),
                         "mfu_pct": round(100 * achieved / cfg["peak"], 1) if cfg["peak"] else None}
            if mode == "compiled":
                out[mode]["graph_breaks"] = {k[:200]: v for k, v in
                                             torch._dynamo.utils.counters["graph_break"].items()}
    return out


def smoke_cases(tiny):
    """(name, script, flags) of every SSL script's methods (--tiny: TINY_CASES), bf16, 3 steps."""
    res = dict(arch="resnet8" if tiny else "resnet18", proj_hidden_dim=64, proj_dim=32)
    vit = dict(arch="vit_debug", patch_size=8, num_heads=2, proj_hidden_dim=64, proj_dim=32)
    cases = [("simclr", "simclr", res), ("mocov3", "mocov3", dict(res, pred_hidden_dim=64)),
             ("mocov3 ViT", "mocov3", dict(vit, pred_hidden_dim=64)),
             ("byol", "byol", dict(res, pred_hidden_dim=64)),
             ("simsiam", "simsiam_gsg", dict(res, gsg="false", pred_hidden_dim=16)),
             ("simsiam + GSG", "simsiam_gsg", dict(res, pred_hidden_dim=16)),
             ("byol + GSG", "simsiam_gsg", dict(res, base="byol", pred_hidden_dim=16)),
             ("msbreg K=4", "msbreg", dict(res, num_views=4)),
             ("ifaclr lwclr", "ifaclr", dict(vit, method="lwclr")),
             ("ifaclr simlwclr", "ifaclr", dict(vit, method="simlwclr"))]
    cases += [(f"sdssl {f}", "sdssl", dict(vit, framework=f, isd_hidden_dim=32, pred_hidden_dim=64))
              for f in ("mocov3", "byol", "simclr")]
    return [(name, script, dict(flags, amp="bf16", aug_device="gpu", batch_size=16))
            for name, script, flags in cases if not tiny or name in TINY_CASES]


# --tiny (the CPU test of this command) smokes a few cases only: tests/test_amp_steps.py steps every
# script and method under autocast on the CPU already.
TINY_CASES = ("simclr", "mocov3 ViT", "sdssl mocov3", "kd", "factor")


def smoke(cfg):
    """Every case's 3 steps: ok with its loss, or the error's last line."""
    import ifacd_distill
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, flags in smoke_cases(cfg["tiny"]):
            results[name] = attempt(lambda: run(script, dict(flags), os.path.join(tmp, name)))
        teacher = os.path.join(tmp, "teacher")
        distill = dict(amp="bf16", batch_size=16, teacher="resnet8", student="resnet8",
                       init_epochs=1, crd_negatives=64)
        results["distill teacher"] = attempt(
            lambda: run("ifacd_distill", dict(distill, distill="none"), teacher))
        for method in [m for m in ifacd_distill.METHODS
                       if m != "none" and (not cfg["tiny"] or m in TINY_CASES)]:
            flags = dict(distill, distill=method, teacher_ckpt=os.path.join(teacher, "last.pt"),
                         student="resnet8x4" if method == "abound" else "resnet8")
            results[f"distill {method}"] = attempt(lambda: run("ifacd_distill", flags,
                                                               os.path.join(tmp, method)))
    return results


def attempt(fn):
    """{'ok': True, 'loss': ..., 's': ...} or {'ok': False, 'error': the exception's last line}."""
    start = time.perf_counter()
    try:
        row = fn()
        return {"ok": True, "loss": round(row["loss"], 5),
                "s": round(time.perf_counter() - start, 1)}
    except Exception as e:  # the report goes on: one failure is one line of it
        message = str(e).splitlines()[0] if str(e) else ""
        return {"ok": False, "error": f"{type(e).__name__}: {message}"[:300],
                "where": traceback.format_exc().strip().splitlines()[-3][:200]}


def resume(cfg):
    """SimCLR 2 epochs straight vs 1 epoch, then resumed for the second: the largest weight
    difference."""
    flags = dict(arch=cfg["arch"], amp="bf16", aug_device="gpu", batch_size=cfg["small_batch"],
                 save_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        straight, resumed = os.path.join(tmp, "straight"), os.path.join(tmp, "resumed")
        run("simclr", dict(flags), straight, steps=3, epochs=2)
        os.makedirs(resumed)
        os.replace(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))
        run_resumed(flags, resumed)
        a, b = (torch.load(os.path.join(d, "last.pt"), map_location="cpu",
                           weights_only=True)["model"] for d in (straight, resumed))
    diffs = [(a[k].float() - b[k].float()).abs().max().item()
             for k in a if a[k].is_floating_point()]
    return {"bit_exact": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": max(diffs)}


def run_resumed(flags, out):
    """bench.run_script deletes last.pt (a fresh run); a resume must keep it."""
    module = importlib.import_module("simclr")
    extra = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    sys.argv = ["simclr.py", "--dataset", "fake", "--epochs", "2", "--max_steps_per_epoch", "3",
                "--eval_every", "0", "--num_workers", "0", "--output_dir", out,
                "--log_every", "1000000", *extra]
    quiet(module.main)


def augmentation(cfg):
    """Two SimCLR views of the same images: batched on the device vs torchvision on one CPU core."""
    size, n = cfg["size"], cfg["aug_batch"]
    recipe = augment.simclr_recipe(size, strength=0.5, blur=False)
    data.FAKE_SIZES.update(train=n, side=size)
    images = data.fake_set("train").images
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = augment.ViewMaker([recipe], 2, device, "gpu", "fake")
    pil = augment.TwoViews(augment.to_torchvision(recipe))
    from PIL import Image
    torch.manual_seed(0)
    views(images)  # warm-up: the device caches
    bench.sync()
    start = time.perf_counter()
    batched = [views(images) for _ in range(cfg["aug_calls"])]
    bench.sync()
    batched_rate = cfg["aug_calls"] * n / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    tv = [pil(Image.fromarray(img.numpy())) for img in images]
    tv_rate = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    ours = torch.cat([v.float().cpu() for pair in batched for v in pair])  # normalised views
    theirs = torch.stack([v for pair in tv for v in pair])
    return {"batched_img_per_s": round(batched_rate),
            "torchvision_img_per_s_one_core": round(tv_rate),
            "speedup": round(batched_rate / tv_rate, 1),
            "mean": [round(ours.mean().item(), 4), round(theirs.mean().item(), 4)],
            "std": [round(ours.std().item(), 4), round(theirs.std().item(), 4)]}


def sdssl_ratio(cfg):
    """SD-MoCo v3 / MoCo v3 (sdssl.py, plain = --alpha_max 0 --pred_loss false) step time."""
    flags = dict(arch=cfg["vit"], patch_size=cfg["patch"], amp="bf16", aug_device="gpu",
                 batch_size=cfg["vit_batch"], image_size=cfg["vit_size"])
    if cfg["tiny"]:
        flags.update(proj_hidden_dim=64, isd_hidden_dim=32, pred_hidden_dim=64, proj_dim=32,
                     num_heads=2)
    data.FAKE_SIZES.update(train=cfg["vit_batch"] * cfg["steps"], side=cfg["vit_size"])
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for name, extra in (("plain", dict(alpha_max=0, pred_loss="false")), ("sd", {})):
            row = run("sdssl", dict(flags, **extra), tmp, steps=cfg["steps"], epochs=2)
            times[name] = 1000 * cfg["vit_batch"] / row["img_per_s"]
    return {"ms_per_step": {k: round(v, 1) for k, v in times.items()},
            "ratio": round(times["sd"] / times["plain"], 3)}


def precision(cfg):
    """The first-step loss of every SSL smoke case in bf16 and in fp32, the same seed."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, flags in smoke_cases(cfg["tiny"]):
            losses = {}
            for amp in ("bf16", "none"):
                row = run(script, dict(flags, amp=amp), os.path.join(tmp, name + amp), steps=1)
                losses[amp] = row["loss"]
            diff = abs(losses["bf16"] - losses["none"]) / max(abs(losses["none"]), 1e-8)
            out[name] = {"bf16": round(losses["bf16"], 5), "fp32": round(losses["none"], 5),
                         "rel_diff": round(diff, 4)}
    return out


def host_syncs(cfg):
    """SimCLR, BYOL and GSG steps with CUDA's sync debug mode on: the warnings each run raised (the
    log lines and the epoch's end sync by design; the steps between them should raise none)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA (tests/test_gpu_readiness.py counts the syncs on the CPU)"}
    out = {}
    for name, script, flags in smoke_cases(cfg["tiny"])[:7]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    run(script, dict(flags, log_every=1000000), tmp, steps=8)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out[name] = len([w for w in caught if "synchroniz" in str(w.message)])
    return out


SECTIONS = [("environment", environment), ("simclr_step", simclr_step), ("smoke", smoke),
            ("resume", resume), ("augmentation", augmentation), ("sdssl_ratio", sdssl_ratio),
            ("precision", precision), ("host_syncs", host_syncs)]


def settings(args):
    tiny = args.tiny
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = args.peak_tflops * 1e12 or next((v for k, v in PEAK.items() if k in name), 0.0)
    return dict(tiny=tiny, arch="resnet8" if tiny else "resnet18", batch=16 if tiny else 512,
                small_batch=16 if tiny else 128, size=32, steps=2 if tiny else 20, peak=peak,
                aug_batch=32 if tiny else 512, aug_calls=2 if tiny else 20,
                vit="vit_debug" if tiny else "vit_small",
                patch=8 if tiny else 16, vit_size=32 if tiny else 224, vit_batch=16 if tiny else 64)


def markdown(report):
    lines = [f"# GPU report ({report['environment'].get('device', '?')})", ""]
    for name, result in report.items():
        lines += [f"## {name}", "", "```json", json.dumps(result, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for report.md and report.json")
    p.add_argument("--tiny", action="store_true", help="toy sizes, no torch.compile (the CPU test)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the device's peak for MFU (default: PEAK)")
    names = [n for n, _ in SECTIONS]
    p.add_argument("--sections", nargs="+", default=names, choices=names)
    args = p.parse_args(argv)
    cfg = settings(args)
    os.makedirs(args.out, exist_ok=True)
    report = {}
    for name, fn in SECTIONS:
        if name not in args.sections:
            continue
        start = time.perf_counter()
        data.FAKE_SIZES.update(train=1024, side=32)  # each section sets its own fake images
        try:
            report[name] = fn(cfg) if name != "environment" else fn()
        except Exception as e:  # a broken section is a line of the report, not the end of it
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                            "trace": traceback.format_exc()[-1500:]}
        report[name + "_s"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(markdown(report))
    print(f"wrote {os.path.join(args.out, 'report.md')}")


if __name__ == "__main__":
    main()
