"""scripts/run_table.py ifacd: the slides' four tables (accuracy with its ablation, memory, parameters, training time)
written from synthetic finished runs: row and column order, the averages, the ablation arrows and the "cpu" cells;
the runner's dry run, its summary of finished runs, its default (the whole table) and a config for every cell."""
import json
import os
import sys

import ifacd_distill as M
from common import checkpoint, config, log
from helpers import ROOT

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


# ----- the runner: plans, dry runs, summaries, the configs of every cell -----

PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "resnet110-resnet20"]  # the slides' columns


def run_table(capsys, *argv):
    """scripts/run_table.py with argv, in this process (nothing here launches: dry runs, or every run finished)."""
    capsys.readouterr()
    R.main(list(argv))
    return capsys.readouterr().out


def test_run_table_dry_run_and_summary(tmp_path, capsys):
    root = str(tmp_path / "table")
    argv = ["--methods", "student", "ifacd2", "--pairs", "resnet56-resnet20", "resnet110-resnet20",
            "--seeds", "0", "1", "--out_root", root]
    printed = run_table(capsys, "ifacd", *argv, "--dry_run", "--", "--epochs", "1").splitlines()
    commands = [line for line in printed if "ifacd_distill.py" in line]
    assert len(commands) == 2 + 2 + 4  # two teachers once, resnet20 vanilla x 2 seeds, 2 pairs x 2 seeds
    assert sum("vanilla_resnet56.yaml" in c for c in commands) == 1 and all(c.endswith("--epochs 1") for c in commands)
    assert "--teacher_ckpt " + os.path.join(root, "vanilla_resnet56", "last.pt") in commands[-4]
    assert not os.path.exists(root)  # a dry run writes nothing
    # Finished runs are skipped and summarised: fake them (a complete last.pt and a log.jsonl each).
    accs = {"vanilla_resnet56": [72.0], "vanilla_resnet110": [74.0], "vanilla_resnet20/seed0": [69.0],
            "vanilla_resnet20/seed1": [70.0], "resnet56-resnet20_ifacd2/seed0": [71.0],
            "resnet56-resnet20_ifacd2/seed1": [72.0], "resnet110-resnet20_ifacd2/seed0": [70.5],
            "resnet110-resnet20_ifacd2/seed1": [71.5]}
    for run, (acc,) in accs.items():
        os.makedirs(os.path.join(root, run))
        checkpoint.save(os.path.join(root, run, "last.pt"), 1, 2, {"epochs": 1})
        log.append_jsonl(os.path.join(root, run, "log.jsonl"), {"epoch": 0, "test_top1": acc, "best_test_top1": acc})
    out = run_table(capsys, "ifacd", *argv)
    assert "ifacd_distill.py" not in out and out.count("# done") == 8
    table = open(os.path.join(root, "results.md")).read()
    assert ("| ifacd2 | 71.50 ± 0.71 (n=2) [slides 71.7] | 71.00 ± 0.71 (n=2) [slides 71.57] "
            "| 71.25 [slides 71.63] |") in table
    assert "| student | 69.50 ± 0.71 (n=2) [slides 69] | 69.50 ± 0.71 (n=2) [slides 69] |" in table
    assert "| teacher | 72.00 ± 0.00 (n=1) [slides 72.79] |" in table
    assert len(open(os.path.join(root, "results.csv")).read().splitlines()) == 1 + 8


TABLE_ROWS = ["kd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "nst", "crd", "ifacd1",
              "ifacd2", "ifacd3"]
REPDISTILLER_B = {"crd": 0.8, "hint": 100, "attention": 1000, "similarity": 3000, "correlation": 0.02, "vid": 1,
                  "rkd": 1, "pkt": 30000, "nst": 50}  # RepDistiller scripts/run_cifar_distill.sh -b (section 9)


def test_every_cell_of_the_table_has_a_config():
    """Six pairs x 13 method rows: each YAML parses, names its pair and method, keeps S000's alpha = beta = 1, and
    weighs the RepDistiller methods with RepDistiller's b."""
    for pair in PAIRS:
        t_name, s_name = pair.split("-")
        for row in TABLE_ROWS:
            path = os.path.join(ROOT, "configs", "ifacd_distill", f"{pair}_{row}.yaml")
            cfg = config.parse(M.Config, ["--config", path])
            method = "ifacd" if row.startswith("ifacd") else row
            assert (cfg.teacher, cfg.student, cfg.distill) == (t_name, s_name, method), (pair, row)
            assert cfg.alpha == cfg.beta == 1 and cfg.output_dir.endswith(f"{pair}_{row}")
            assert cfg.teacher_ckpt == f"out/ifacd_distill/vanilla_{t_name}/last.pt"
            if method in REPDISTILLER_B:
                assert cfg.gamma == REPDISTILLER_B[method], (pair, row)
            if method == "ifacd":
                assert cfg.ifacd_layers == int(row[-1])


def test_run_table_defaults_to_the_whole_table(tmp_path, capsys):
    printed = run_table(capsys, "ifacd", "--seeds", "0", "--out_root", str(tmp_path), "--dry_run")
    commands = [c for c in printed.splitlines() if "ifacd_distill.py" in c]
    # 5 teachers, 5 vanilla students (resnet20 serves two pairs), 13 rows x 6 pairs
    assert len(commands) == 5 + 5 + 13 * 6
    unnamed = run_table(capsys, "--seeds", "0", "--out_root", str(tmp_path), "--dry_run")  # before tables had names
    assert [c for c in unnamed.splitlines() if "ifacd_distill.py" in c] == commands
    for row in TABLE_ROWS:
        assert sum(f"_{row}.yaml" in c for c in commands) == 6, row
