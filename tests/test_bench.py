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
