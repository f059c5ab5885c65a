"""RepDistiller's CIFAR-100 benchmark (github.com/HobbitLong/RepDistiller, README "Benchmark Results on CIFAR-100"):
configs/ifacd_distill/repdistiller/ holds exactly the README's cells, each with run_cifar_distill.sh's weights and
train_student.py's recipe (each cell builds and trains one step: tests/test_distill_losses.py);
`scripts/run_table.py repdistiller` writes the README's two tables from synthetic finished runs (column and row
order, labels, the README's numbers beside ours, "-" for a missing run, the flagged 0.00) and plans its runs
(teachers first, each cell's config and the teacher's checkpoint)."""
import csv
import glob
import json
import os
import sys

import pytest

from common import checkpoint, config
from helpers import REPDISTILLER_DIFF as DIFF, REPDISTILLER_SAME as SAME, ROOT

import ifacd_distill as I

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import run_table as R  # noqa: E402  (scripts/run_table.py)

CONFIGS = os.path.join(ROOT, "configs", "ifacd_distill", "repdistiller")

# ----- the README, transcribed here independently of run_table.py (its column and row order) -----

# SAME, DIFF: the README's two tables' columns (helpers.py)
ROWS = [("kd", "KD"), ("hint", "FitNet"), ("attention", "AT"), ("similarity", "SP"), ("correlation", "CC"),
        ("vid", "VID"), ("rkd", "RKD"), ("pkt", "PKT"), ("abound", "AB"), ("factor", "FT"), ("fsp", "FSP"),
        ("nst", "NST"), ("crd", "CRD")]  # FSP: table 1 only
# scripts/run_cifar_distill.sh: (-r, -a, -b) = (alpha, beta, gamma); -r is 1 (train_student.py's default) but for KD
WEIGHTS = {"kd": (0.1, 0.9, 0.0), "hint": (1, 0, 100), "attention": (1, 0, 1000), "similarity": (1, 0, 3000),
           "correlation": (1, 0, 0.02), "vid": (1, 0, 1), "rkd": (1, 0, 1), "pkt": (1, 0, 30000), "abound": (1, 0, 1),
           "factor": (1, 0, 200), "fsp": (1, 0, 50), "nst": (1, 0, 50), "crd": (1, 0, 0.8)}
SMALL = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # train_student.py: lr 0.01 (mobile_half = our MobileNetV2)
# Three rows and the Teacher / Student row, all 13 columns (SAME + DIFF), for the numbers beside ours.
README = {"teacher": [75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64, 74.64, 79.34, 79.34, 79.42, 79.42, 75.61],
          "student": [73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36, 64.60, 64.60, 70.36, 70.50, 71.82, 70.50],
          "kd": [74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98, 67.37, 67.35, 73.81, 74.07, 74.45, 74.83],
          "fsp": [72.91, 0.00, 69.95, 70.11, 71.89, 72.62, 70.23],
          "crd": [75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94, 69.73, 69.11, 74.30, 75.11, 75.65, 76.05]}


def readme(row, pair):
    return README[row][(SAME + DIFF).index(pair)]


def cells():
    """{config name: (teacher, student, method)} of every README cell."""
    return {f"{p}_{m}": (*p.split("-"), m) for p in SAME + DIFF for m, _ in ROWS if m != "fsp" or p in SAME}


def load(name, *flags):
    return config.parse(I.Config, ["--config", os.path.join(CONFIGS, name + ".yaml"), *flags])


# ----- the configs -----

def test_the_configs_are_the_readme_cells():
    models = {m for p in SAME + DIFF for m in p.split("-")}
    assert len(models) == 15 and len(cells()) == 7 * 13 + 6 * 12
    found = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))}
    assert found == set(cells()) | {f"vanilla_{m}" for m in models}
    assert R.RD_SAME == SAME and R.RD_DIFF == DIFF  # the results table's columns, in the README's order
    assert list(R.RD_LABELS.items()) == ROWS


SHARED = dict(dataset="cifar100", momentum=0.9, nesterov=False, weight_decay=5e-4, exclude_bias_norm=False,
              batch_size=64, epochs=240, lr_milestones=[150, 180, 210], lr_decay=0.1, amp="none", kd_temperature=4.0,
              feat_dim=128, nce_temperature=0.07, crd_negatives=16384, crd_momentum=0.5, crd_mode="exact",
              hint_layer=2, init_epochs=30)  # train_student.py / train_teacher.py defaults


@pytest.mark.parametrize("name", sorted(cells()))
def test_distill_config_recipe(name):
    teacher, student, method = cells()[name]
    cfg = load(name)
    assert (cfg.teacher, cfg.student, cfg.distill) == (teacher, student, method)
    assert (cfg.alpha, cfg.beta, cfg.gamma) == WEIGHTS[method]
    assert cfg.lr == (0.01 if student in SMALL else 0.05)
    assert {k: getattr(cfg, k) for k in SHARED} == SHARED
    assert cfg.teacher_ckpt == f"out/repdistiller/vanilla_{teacher}/last.pt"
    assert cfg.output_dir == f"out/repdistiller/{name}"
    header = open(os.path.join(CONFIGS, name + ".yaml")).read().split("\ndataset:")[0]
    header = " ".join(line.lstrip("# ") for line in header.splitlines())  # one line: wraps anywhere
    label = dict(ROWS)[method]
    assert f"row {label}: {R.reference('repdistiller', method, f'{teacher}-{student}'):.2f}." in header
    a, b = WEIGHTS[method][1:]
    assert f"--distill {method} " in header and f"-a {a:g} -b {b:g}" in header  # the script's line
    assert "fetch_pretrained_teachers.sh" in header


@pytest.mark.parametrize("model", sorted({m for p in SAME + DIFF for m in p.split("-")}))
def test_vanilla_config_recipe(model):
    cfg = load(f"vanilla_{model}")
    assert (cfg.distill, cfg.student, cfg.alpha) == ("none", model, 1.0)
    assert cfg.lr == (0.01 if model in SMALL else 0.05)
    assert {k: getattr(cfg, k) for k in SHARED} == SHARED
    assert cfg.output_dir == f"out/repdistiller/vanilla_{model}"
    teacher = any(p.startswith(model + "-") for p in SAME + DIFF)
    side = 0 if teacher else 1
    number = R.reference("repdistiller", "teacher" if teacher else "student",
                         next(p for p in SAME + DIFF if p.split("-")[side] == model))
    assert f"row: {number:.2f} (column" in open(os.path.join(CONFIGS, f"vanilla_{model}.yaml")).read()


# ----- scripts/run_table.py repdistiller -----

P1, P2, P3, P4 = "wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-MobileNetV2", "resnet32x4-ShuffleV1"
# Last-epoch top-1 (seed 0, seed 1) per (row, pair); nothing for crd on P4 (missing), nor fsp on P2.
TOP1 = {("kd", P1): (75.0, 76.0), ("kd", P2): (73.0, 74.0), ("kd", P3): (67.0, 68.0), ("kd", P4): (74.0, 74.5),
        ("crd", P1): (75.5, 75.5), ("crd", P2): (74.0, 74.0), ("crd", P3): (69.0, 70.0),
        ("fsp", P1): (72.0, 73.0),
        ("student", P1): (73.0, 73.5), ("student", P2): (72.0, 72.0), ("student", P3): (64.0, 65.0),
        ("student", P4): (70.0, 71.0)}
TEACHER_TOP1 = {"wrn_40_2": 75.5, "vgg13": 74.5}  # resnet32x4's teacher has not finished


def fake_run(run_dir, top1):
    """A finished 2-epoch run: a last.pt at its last epoch (what is_complete reads) and two log rows."""
    os.makedirs(run_dir)
    checkpoint.save(os.path.join(run_dir, "last.pt"), 2, 4, {"epochs": 2})
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        for epoch, acc in ((0, 1.0), (1, top1)):
            f.write(json.dumps({"epoch": epoch, "test_top1": acc, "best_test_top1": top1 + 0.5}) + "\n")


def write_runs(root):
    for teacher, top1 in TEACHER_TOP1.items():
        fake_run(os.path.join(root, f"vanilla_{teacher}"), top1)
    for (row, pair), accs in TOP1.items():
        for seed, top1 in enumerate(accs):
            run = f"vanilla_{pair.split('-')[1]}" if row == "student" else f"{pair}_{row}"
            fake_run(os.path.join(root, run, f"seed{seed}"), top1)


def tables(text):
    """{caption: [[header cells], [row cells]...]} for the captioned tables of results.md."""
    found, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Teacher and student") and lines[i + 2].startswith("|"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            found[line] = [rows[0]] + rows[2:]  # the header, then the body (no separator)
    return found


SAME_CAPTION = "Teacher and student of the same architectural type (README table 1)."
DIFF_CAPTION = "Teacher and student of different architectural types (README table 2)."


def ours(accs):
    mean, std = sum(accs) / len(accs), (abs(accs[0] - accs[1]) / 2 ** 0.5 if len(accs) == 2 else 0.0)
    return f"{mean:.2f} ± {std:.2f} (n={len(accs)})"


def test_readme_tables_from_synthetic_runs(tmp_path):
    root = str(tmp_path / "table")
    write_runs(root)
    # Pairs and methods in another order than the README's: the tables put them back in its order.
    args, extra = R.parse_args(["--pairs", P4, P2, P3, P1, "--methods", "crd", "fsp", "student", "kd",
                                "--seeds", "0", "1", "--out_root", root], "repdistiller")
    runs = R.plan(args, extra)
    todo = {r[3] for r in runs if r[4] is not None}
    assert todo == {os.path.join(root, "vanilla_resnet32x4")} | {os.path.join(root, f"{P4}_crd", f"seed{s}")
                                                                  for s in (0, 1)}
    # FSP: no cell on different types, and the flagged 0.00 (P2) is not run
    assert [r[1] for r in runs if r[0] == "fsp"] == [[P1], [P1]]
    R.summarise(args, runs)
    text = open(os.path.join(root, "results.md")).read()
    found = tables(text)
    assert list(found) == [SAME_CAPTION, DIFF_CAPTION]
    same, diff = found[SAME_CAPTION], found[DIFF_CAPTION]
    assert same[0] == ["Teacher <br> Student", "wrn_40_2 <br> wrn_16_2", "wrn_40_2 <br> wrn_40_1"]
    assert diff[0] == ["Teacher <br> Student", "vgg13 <br> MobileNetV2", "resnet32x4 <br> ShuffleV1"]
    assert [r[0] for r in same[1:]] == ["Teacher / Student", "KD", "FSP", "CRD"]
    assert [r[0] for r in diff[1:]] == ["Teacher / Student", "KD", "CRD"]  # the README has no FSP row there

    table = {(r[0], p): c for t, pairs in ((same, [P1, P2]), (diff, [P3, P4])) for r in t[1:]
             for p, c in zip(pairs, r[1:])}
    for label, row in (("KD", "kd"), ("CRD", "crd"), ("FSP", "fsp")):
        for pair in ([P1, P2] if row == "fsp" else [P1, P2, P3, P4]):
            accs = TOP1.get((row, pair))
            flag = "*" if (row, pair) == ("fsp", P2) else ""
            assert table[label, pair] == f"{ours(accs) if accs else '-'} [RepDistiller {readme(row, pair):.2f}{flag}]"
    assert table["KD", P1] == "75.50 ± 0.71 (n=2) [RepDistiller 74.92]"
    assert table["CRD", P4] == "- [RepDistiller 75.11]"  # missing run
    assert table["FSP", P2] == "- [RepDistiller 0.00*]"  # the README's 0.00, flagged
    assert "* FSP wrn_40_2 → wrn_40_1: the README prints 0.00: RepDistiller's FSP refuses the pair" in text
    for pair in (P1, P2, P3, P4):
        teacher = pair.split("-")[0]
        t = ours([TEACHER_TOP1[teacher]]) if teacher in TEACHER_TOP1 else "-"
        assert table["Teacher / Student", pair] == (f"{t} / {ours(TOP1['student', pair])} [RepDistiller "
                                                    f"{readme('teacher', pair):.2f} / {readme('student', pair):.2f}]")
    assert table["Teacher / Student", P4].startswith("- / 70.50 ± 0.71 (n=2)")

    with open(os.path.join(root, "results.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "pairs", "seed", "last_top1", "best_top1", "run_dir"]
    assert ["teacher", f"{P2} {P1}", "0", "75.50", "76.00", os.path.join(root, "vanilla_wrn_40_2")] in rows
    assert len(rows) == 1 + 2 + 2 * len(TOP1)


def test_whole_readme_layout_without_runs(tmp_path):
    """Every pair and row by default: both tables in the README's order, its labels, its number in every cell."""
    args, extra = R.parse_args(["--out_root", str(tmp_path / "none")], "repdistiller")
    assert args.methods == ["student"] + [m for m, _ in ROWS] and args.pairs == SAME + DIFF
    lines = R.summarise(args, [(m, c, s, o, ["cmd"]) for m, c, s, o, _ in R.plan(args, extra)], write=False)
    found = tables("\n".join(lines))
    for caption, pairs in ((SAME_CAPTION, SAME), (DIFF_CAPTION, DIFF)):
        head, *body = found[caption]
        assert head[1:] == [p.replace("-", " <br> ") for p in pairs]
        labels = [label for m, label in ROWS if m != "fsp" or pairs is SAME]
        assert [r[0] for r in body] == ["Teacher / Student"] + labels
        for row in body:
            method = dict((label, m) for m, label in ROWS).get(row[0])
            for pair, cell in zip(pairs, row[1:]):
                if method is None:
                    ref = f"{readme('teacher', pair):.2f} / {readme('student', pair):.2f}"
                    assert cell == f"- / - [RepDistiller {ref}]"
                else:
                    value = R.reference("repdistiller", method, pair)
                    if method in README:
                        assert value == readme(method, pair)
                    assert cell == f"- [RepDistiller {value:.2f}{'*' if (method, pair) == ('fsp', SAME[1]) else ''}]"


def test_dry_run_commands(tmp_path, capsys):
    root = str(tmp_path / "out")
    R.main(["repdistiller", "--methods", "student", "fsp", "crd", "--pairs", "resnet32x4-ShuffleV1",
            "resnet32x4-resnet8x4", "--seeds", "0", "--nproc", "0", "--out_root", root, "--dry_run", "--",
            "--device", "cpu"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "ifacd_distill.py" in line]
    runs = [(os.path.basename(c[c.index("--config") + 1]), c[c.index("--output_dir") + 1],
             c[c.index("--teacher_ckpt") + 1] if "--teacher_ckpt" in c else None) for c in lines]
    ckpt = os.path.join(root, "vanilla_resnet32x4", "last.pt")
    assert runs == [("vanilla_resnet32x4.yaml", os.path.join(root, "vanilla_resnet32x4"), None),  # the teacher first
                    ("vanilla_ShuffleV1.yaml", os.path.join(root, "vanilla_ShuffleV1", "seed0"), None),
                    ("vanilla_resnet8x4.yaml", os.path.join(root, "vanilla_resnet8x4", "seed0"), None),
                    ("resnet32x4-resnet8x4_fsp.yaml", os.path.join(root, "resnet32x4-resnet8x4_fsp", "seed0"), ckpt),
                    ("resnet32x4-ShuffleV1_crd.yaml", os.path.join(root, "resnet32x4-ShuffleV1_crd", "seed0"), ckpt),
                    ("resnet32x4-resnet8x4_crd.yaml", os.path.join(root, "resnet32x4-resnet8x4_crd", "seed0"), ckpt)]
    assert all(os.path.dirname(c[c.index("--config") + 1]) == CONFIGS for c in lines)
    assert all(c[-2:] == ["--device", "cpu"] and c[c.index("--seed") + 1] == "0" for c in lines)
    assert not os.path.exists(root)  # a dry run writes nothing


def test_methods_outside_the_readme_are_refused():
    for method in ("kdsvd", "ifacd1", "teacher"):
        with pytest.raises(SystemExit):
            R.parse_args(["--methods", method], "repdistiller")
    with pytest.raises(SystemExit):
        R.parse_args(["--pairs", "resnet56-resnet20", "vgg13-vgg8x"], "repdistiller")
