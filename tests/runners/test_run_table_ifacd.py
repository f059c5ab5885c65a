"""scripts/run_table.py ifacd: the slides' four tables (accuracy with its ablation, memory, parameters, training time)
written from synthetic finished runs: row and column order, the averages, the ablation arrows and the "cpu" cells."""
import json
import os
import sys

from common import checkpoint
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import run_table as R  # noqa: E402  (scripts/run_table.py)

P1, P2 = "wrn_40_2-wrn_16_2", "resnet56-resnet20"  # the slides' columns 1 and 4
# Last-epoch top-1 (seed 0, seed 1) per (row, pair); crd has no finished run on P2.
TOP1 = {("kd", P1): (75.0, 76.0), ("kd", P2): (71.0, 72.0), ("crd", P1): (75.5, 76.5),
        ("ifacd1", P1): (75.0, 75.6), ("ifacd1", P2): (71.4, 71.6),
        ("ifacd2", P1): (75.5, 75.9), ("ifacd2", P2): (71.5, 71.5),
        ("ifacd3", P1): (74.8, 75.0), ("ifacd3", P2): (71.8, 72.0),
        ("student", P1): (71.0, 72.0), ("student", P2): (69.0, 70.0)}
TEACHER_TOP1 = {"wrn_40_2": 76.0, "resnet56": 73.0}
CPU_ROWS = ("kd",)  # these ran on the CPU: no peak_mem_reserved_gb in their logs


def fake_run(run_dir, top1, pair, seed, cuda, params):
    """A finished 2-epoch run: a complete last.pt (what is_complete reads) and two log rows, the last one counting.
    CUDA runs log peak_mem_reserved_gb = 0.1 (seed + 1) (+0.5 on P1, +1 for crd), all log train_time_s =
    (seed + 1) h (x2 on P1)."""
    os.makedirs(run_dir)
    checkpoint.save(os.path.join(run_dir, "last.pt"), 2, 4, {"epochs": 2})
    hours = (seed + 1) * (2 if pair == P1 else 1)
    last = {"epoch": 1, "test_top1": top1, "best_test_top1": top1 + 0.5, "params": 1, "params_slides": params,
            "train_time_s": 3600.0 * hours}
    first = {**last, "epoch": 0, "test_top1": 1.0, "train_time_s": 1.0}
    if cuda:
        gb = 0.1 * (seed + 1) + (0.5 if pair == P1 else 0.0) + (1.0 if "_crd" in run_dir else 0.0)
        last["peak_mem_reserved_gb"], first["peak_mem_reserved_gb"] = gb, 0.01
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.write(json.dumps(first) + "\n" + json.dumps(last) + "\n")


def write_runs(root):
    for teacher, top1 in TEACHER_TOP1.items():
        fake_run(os.path.join(root, f"vanilla_{teacher}"), top1, P1 if teacher == "wrn_40_2" else P2, 0, True, 1)
    for (row, pair), accs in TOP1.items():
        for seed, top1 in enumerate(accs):
            student = pair.split("-")[1]
            run = f"vanilla_{student}" if row == "student" else f"{pair}_{row}"
            params = (2_960_000 if row == "kd" else 3_020_000) if pair == P1 else \
                (1_140_000 if row == "kd" else 1_180_000)
            fake_run(os.path.join(root, run, f"seed{seed}"), top1, pair, seed, row not in CPU_ROWS, params)


def tables(text):
    """{caption's first word: [[label, cells...], ...]} for every captioned table in results.md."""
    found, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("|") and i + 2 < len(lines) and lines[i + 2].startswith("| Method"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            found[line.split()[0]] = [rows[0]] + rows[2:]  # the header, then the body (no separator)
    return found


def test_slides_tables_from_synthetic_logs(tmp_path):
    root = str(tmp_path / "table")
    write_runs(root)
    # Pairs and methods in another order than the slides': the tables put them back in the slides' order.
    args, extra = R.parse_args(["--pairs", P2, P1, "--methods", "student", "ifacd3", "ifacd2", "kd", "ifacd1", "crd",
                                "--seeds", "0", "1", "--out_root", root])
    runs = R.plan(args, extra)
    assert [r[3] for r in runs if r[4] is not None] == [os.path.join(root, f"{P2}_crd", f"seed{s}") for s in (0, 1)]
    R.summarise(args, runs)
    found = tables(open(os.path.join(root, "results.md")).read())
    assert set(found) == {"Top-1", "Intermediate", "Memory", "Parameters", "Training"}
    header = ["Method", "wrn_40_2 → wrn_16_2", "resnet56 → resnet20", "Average"]
    assert all(t[0] == header for t in found.values())

    # Accuracy: the slides' row order, vanilla rows last, ifacd3 only in the ablation; Average = mean over the pairs.
    acc = found["Top-1"][1:]
    assert [r[0] for r in acc] == ["crd", "kd", "ifacd1", "ifacd2", "Student vanilla", "Teacher vanilla"]
    assert acc[0] == ["crd", "76.00", "-", "-"]  # P2 unfinished: no average
    assert acc[1] == ["kd", "75.50", "71.50", "73.50"]  # (75.5 + 71.5) / 2
    assert acc[2] == ["ifacd1", "75.30", "71.50", "73.40"]
    assert acc[4] == ["Student vanilla", "71.50", "69.50", "70.50"]
    assert acc[5] == ["Teacher vanilla", "76.00", "73.00", "74.50"]

    # Ablation against ifacd1 (75.30, 71.50, 73.40): up, down, and no mark when equal (as the slides).
    assert found["Intermediate"][1:] == [["ifacd1", "75.30", "71.50", "73.40"],
                                         ["ifacd2", "75.70↑", "71.50", "73.60↑"],
                                         ["ifacd3", "74.90↓", "71.90↑", "73.40"]]

    # Memory, parameters, time: alphabetical rows (ifacd3 too); kd ran on the CPU: "cpu", not a number.
    rows = ["crd", "ifacd1", "ifacd2", "ifacd3", "kd"]
    for name in ("Memory", "Parameters", "Training"):
        assert [r[0] for r in found[name][1:]] == rows, name
    memory = {r[0]: r[1:] for r in found["Memory"][1:]}
    assert memory["ifacd1"] == ["0.65", "0.15", "0.40"]  # mean(0.6, 0.7), mean(0.1, 0.2), their mean
    assert memory["crd"] == ["1.65", "-", "-"] and memory["kd"] == ["cpu", "cpu", "cpu"]
    params = {r[0]: r[1:] for r in found["Parameters"][1:]}
    assert params["kd"] == ["2.96", "1.14", "2.05"] and params["ifacd2"] == ["3.02", "1.18", "2.10"]
    time = {r[0]: r[1:] for r in found["Training"][1:]}
    assert time["ifacd2"] == ["3.00", "1.50", "2.25"]  # hours: mean(2, 4), mean(1, 2), their mean
    assert time["kd"] == ["cpu", "cpu", "cpu"] and time["crd"] == ["3.00", "-", "-"]


def test_cells_mix_and_missing_runs():
    """A GPU figure counts only the runs made on CUDA; a cell without runs is None ("-")."""
    rows = [{"train_time_s": 7200.0, "peak_mem_reserved_gb": 1.0}, {"train_time_s": 3600.0}]
    assert R.cell(rows, "train_time_s", 1 / 3600, gpu_only=True) == 2.0
    assert R.cell(rows, "train_time_s", 1 / 3600) == 1.5
    assert R.cell([], "params_slides") is None
    assert R.with_average([1.0, "cpu"]) == [1.0, "cpu", None] and R.with_average(["cpu"]) == ["cpu", "cpu"]
