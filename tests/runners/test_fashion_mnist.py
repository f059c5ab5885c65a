"""scripts/fashion_mnist.py (`run_table.py fashion_mnist`, `fashion_mnist_distill`): the table runner end to end on
tiny idx files this test writes (no download), its runs in this process (helpers.InProcess) and, slow, each in its
own interpreter as in real use; and the distillation table's gain column. (Reading the idx files:
tests/common/test_data_idx.py.)"""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, InProcess, env, write_fashion

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import run_table as R  # noqa: E402  (scripts/run_table.py)
import runs  # noqa: E402  (scripts/runs.py: the runners' launches)


@pytest.fixture(params=["in_process", pytest.param("processes", marks=pytest.mark.slow)])
def run_table(request, monkeypatch, capsys):
    """`python scripts/run_table.py ARGV`, its stdout returned: in_process, the runner and every run it launches in
    this process (the default run); processes (slow: an interpreter per run, 14 here), as a user runs it."""
    if request.param == "in_process":
        request.getfixturevalue("process_group")
        monkeypatch.setattr(runs, "subprocess", InProcess)

        def in_process(*argv):
            capsys.readouterr()
            R.main(list(argv))
            return capsys.readouterr().out
        return in_process

    def processes(*argv, timeout=900):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_table.py"), *argv], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout
    return processes


def test_fashion_mnist_tables_end_to_end(run_table, tmp_path):
    """The runner on tiny idx files with every run cut to one step: two SSL rows (a CIFAR-zoo ResNet and the small
    ViT, SDSSL), their random-init and raw-pixel baselines, and the distillation table's teacher and two students;
    the tables, the CSV, the curves and the wall times are written, and a second call runs nothing."""
    root = write_fashion(str(tmp_path / "data"))
    out, out_distill = str(tmp_path / "table"), str(tmp_path / "distill")
    tiny = ["--data_dir", root, "--linear_epochs", "2", "--", "--epochs", "1", "--max_steps_per_epoch", "1",
            "--batch_size", "8", "--device", "cpu"]
    ssl = ["fashion_mnist", "--rows", "simclr", "sd_mocov3_vit", "--out_root", out, *tiny]
    first = run_table(*ssl)
    table = open(os.path.join(out, "results.md")).read()
    for needle in ("| SimCLR | resnet8 |", "| SD-MoCo v3 (ViT) | vit_mini_p7_h4 |", "| random init | resnet8 |",
                   "| random init | vit_mini_p7_h4 |", "| raw pixels | - |", "Total wall time", "- simclr/seed0: "):
        assert needle in table, needle
    evals = [json.load(open(os.path.join(out, d, "seed0", "eval.json"))) for d in ("simclr", "sd_mocov3_vit")]
    assert all(set(e) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200", "linear_top1",
                          "linear_top5"} for e in evals)
    assert all(0 <= v <= 100 for e in evals for v in e.values())
    assert len(open(os.path.join(out, "results.csv")).read().splitlines()) == 1 + 2
    assert set(json.load(open(os.path.join(out, "curves.json")))) == {"SimCLR", "SD-MoCo v3 (ViT)"}
    try:
        import matplotlib  # noqa: F401  (optional: without it the runner says so and writes curves.json only)
        assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    except ImportError:
        assert "no curves.png" in first
    assert "# running" not in run_table(*ssl)  # everything is done: nothing runs again
    run_table("fashion_mnist_distill", "--rows", "vanilla", "kd", "--out_root", out_distill, *tiny)
    table = open(os.path.join(out_distill, "results.md")).read()
    for needle in ("| teacher resnet56 |", "| resnet20 alone |", "| resnet20 + KD |", "- teacher: "):
        assert needle in table, needle


def test_distill_table_compares_each_student_with_itself_alone(tmp_path):
    """The distillation table's gain column: each distilled row minus the same student trained alone (resnet20's
    rows against resnet20 alone, MobileNetV2's against MobileNetV2 alone); none for the teacher and the alone rows."""
    import fashion_mnist as FM  # scripts/fashion_mnist.py
    top1 = {"teacher": 91.0, "vanilla": 87.0, "kd": 86.5, "mobilenetv2": 80.0, "mobilenetv2_kd": 82.25}
    for key, acc in top1.items():
        run = tmp_path / key if key == "teacher" else tmp_path / key / "seed0"
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text(json.dumps({"epoch": 0, "test_top1": acc, "img_per_s": 100.0}) + "\n")
    args, _ = FM.parse_args(["--out_root", str(tmp_path), "--rows", *top1], "fashion_mnist_distill")
    lines, _ = FM.distill_table(args)
    gains = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2] for line in lines[2:]}
    assert gains == {"teacher resnet56": "-", "resnet20 alone": "-", "resnet20 + KD": "-0.50",
                     "MobileNetV2 alone": "-", "MobileNetV2 + KD": "+2.25"}
