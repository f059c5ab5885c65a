"""bench.py: its own flags never take a script's (no abbreviations); a tiny real run works."""
import pytest

import bench
from helpers import launch


@pytest.mark.parametrize("argv, extra", [
    # --compile was taken as --compiled_hue (leaving `true` for the script), --aug as --augment
    (["--script", "simclr", "--compile", "true", "--aug_device", "gpu"],
     ["--compile", "true", "--aug_device", "gpu"]),
    (["--script", "byol", "--aug", "byol", "--steps", "3"], ["--aug", "byol"]),
    (["--script", "sdssl", "--comp", "x", "--compare=--lr 0.1"], ["--comp", "x"]),  # was ambiguous
    (["--script", "simclr", "--compile=true", "--epochs", "1"],
     ["--compile=true", "--epochs", "1"]),
])
def test_script_flags_reach_the_script_unchanged(argv, extra):
    """Flags bench.py does not define go to the script as given and in order, and set none of
    bench's own: `--aug byol` (BYOL's augmentation flag) leaves bench in training mode."""
    _, args, rest = bench.parse_args(argv)
    assert rest == extra
    assert args.script and not args.augment and not args.compiled_hue


@pytest.mark.e2e
def test_a_tiny_training_benchmark_runs_on_the_cpu():
    """SimCLR, resnet8, batch 8, 2 steps per epoch on fake data: the run finishes, the script got
    the flags bench.py does not know (`--aug simclr` once switched bench to its augmentation mode,
    `--aug_device gpu` makes the views batched) and img/s is printed."""
    flags = ["--script", "simclr", "--arch", "resnet8", "--batch_size", "8", "--steps", "2",
             "--aug", "simclr", "--aug_device", "gpu"]
    out = launch("bench.py", flags, nproc=0, timeout=300)
    assert "aug=simclr aug_device=gpu" in out.stdout and "views made batched" in out.stdout
    assert "simclr --arch resnet8 --aug simclr --aug_device gpu --batch_size 8" in out.stdout
    assert " img/s (" in out.stdout and "optimizer" in out.stdout


def test_the_augmentation_benchmark_times_pil_and_both_batched_paths(monkeypatch, capsys):
    """`--augment` on the CPU prints torchvision's rate and the batched path's two (as it runs on the
    CPU, and the GPU's every-op-on-every-image path), each with its ratio to torchvision, and leaves
    batch_augment.CPU_SUBSETS on."""
    from common import batch_augment, data
    monkeypatch.setattr(bench, "AUGMENT_MIN_IMAGES", 8)
    monkeypatch.setattr(data, "FAKE_SIZES", dict(data.FAKE_SIZES))  # bench_augment sets the fake set's size
    _, args, rest = bench.parse_args(["--augment", "--image_size", "16", "--batch_size", "8", "--steps", "1"])
    assert not rest
    bench.bench_augment(args)
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("two 16px views, SimCLR recipe")
    names = [r.split("  ")[1].strip() for r in rows[1:]]
    assert names == ["torchvision (PIL)", "batched on cpu", "batched, the GPU's path"]
    assert all(float(r.split("img/s")[0].split()[-1]) > 0 for r in rows[1:])
    assert all(r.rstrip().endswith("x)") for r in rows[2:])
    assert batch_augment.CPU_SUBSETS


@pytest.mark.e2e
def test_compare_and_data_off_run_in_process(monkeypatch, capsys):
    """--compare times the script's flags and the same + the compared ones in alternating runs and prints both
    medians and their ratio; --data off repeats the loader's first batch (the step alone). Tiny: resnet8, batch 8."""
    import sys
    from common import data, dist, optim
    monkeypatch.setattr(sys, "argv", sys.argv)  # bench sets the script's
    monkeypatch.setattr(dist, "cleanup", lambda: None)  # the test session's process group stays for later tests
    monkeypatch.setattr(data, "FAKE_SIZES", dict(data.FAKE_SIZES))
    monkeypatch.setattr(data, "train_loader", data.train_loader)  # --data off replaces these two: restored after
    monkeypatch.setattr(optim, "build_optimizer", optim.build_optimizer)
    tiny = ["--script", "simclr", "--arch", "resnet8", "--batch_size", "8", "--steps", "2", "--image_size", "16"]
    _, args, rest = bench.parse_args(tiny + ["--repeat", "2", "--compare=--amp none"])
    bench.bench_compare(args, rest)
    out = capsys.readouterr().out
    assert "step time, median of 2 alternating runs of 2 steps" in out
    base, compare = (float(out.split(f"  {name} ")[1].split("ms")[0]) for name in ("base    ", "compare "))
    assert base > 0 and compare > 0 and "[--amp none]" in out
    ratio = float(out.split("ratio compare / base: ")[1].split()[0])
    assert ratio == pytest.approx(compare / base, rel=0.02)  # the medians are printed to 0.1 ms
    _, args, rest = bench.parse_args(tiny + ["--data", "off"])
    bench.bench_training(args, rest)
    out = capsys.readouterr().out
    assert " img/s (" in out and "data wait" in out and "optimizer" in out
