"""The benchmark tables, one entry point:
`python scripts/run_table.py TABLE [options] [-- flags for every run]`.

    ifacd                   the IFACD slides' CIFAR-100 distillation table (S000), with
                            ifacd_distill.py (this file; also what runs when TABLE is left out)
    repdistiller            RepDistiller's CIFAR-100 benchmark (its README's two tables), with
                            ifacd_distill.py
    fashion_mnist           every SSL method on Fashion-MNIST on a CPU, with its baselines
                            (scripts/fashion_mnist.py)
    fashion_mnist_distill   its distillation rows: resnet56 teacher,
                            resnet20 alone / KD / CRD / IFACD

Runs already finished are skipped (a last.pt that reached its final epoch); an unfinished one is
relaunched and resumes on its own (auto-resume). This script only launches processes and reads what
they write; it never imports torch unless a last.pt exists.

The IFACD table trains every teacher the requested pairs need once
(configs/ifacd_distill/vanilla_<teacher>.yaml, seed 0), then runs each (method, pair, seed) and
writes OUT/results.csv (one line per run: last-epoch and best test top-1) and OUT/results.md: the
mean +- std over seeds of the last-epoch top-1 with the slides' number beside it, then the slides'
own tables from the runs' log.jsonl, in their layout: accuracy (and the ifacd1/2/3 ablation with its
arrows), memory (peak_mem_reserved_gb), parameters (params_slides) and training time (train_time_s,
in hours); runs made on the CPU say "cpu" in the memory and time tables.

    python scripts/run_table.py ifacd --seeds 0 1 2 \
        --nproc 1                                     # the whole table: every row, six pairs
    python scripts/run_table.py ifacd --methods kd crd ifacd1 ifacd2 ifacd3 \
        --seeds 0 1 2                                 # some rows
    python scripts/run_table.py ifacd --methods student ifacd2 --pairs resnet56-resnet20 \
        --dry_run                                     # the commands
    python scripts/run_table.py ifacd --methods kd --seeds 0 \
        -- --data_dir /data --num_workers 4           # flags for every run
Methods: `teacher` and `student` (the vanilla rows), or any
configs/ifacd_distill/<teacher>-<student>_<method>.yaml (the table's: kd, hint, attention,
similarity, correlation, vid, rkd, pkt, nst, crd, ifacd1, ifacd2, ifacd3).

The RepDistiller table (github.com/HobbitLong/RepDistiller, README "Benchmark Results on CIFAR-100")
works the same way with configs/ifacd_distill/repdistiller/ (its recipe: plain SGD, weight decay on
every parameter, each method's -r/-a/-b of scripts/run_cifar_distill.sh as alpha/beta/gamma) and
out/repdistiller: 13 pairs, 7 of the same architectural type and 6 of different ones; rows kd (KD),
hint (FitNet), attention (AT), similarity (SP), correlation (CC), vid (VID), rkd (RKD), pkt (PKT),
abound (AB), factor (FT), fsp (FSP, same-type pairs only, as the README), nst (NST), crd (CRD).
OUT/results.md holds the README's two tables in its layout: the pairs as columns in its order, a
"Teacher / Student" row (the teacher, trained once / the student trained alone), then the methods in
its order; each cell is the mean +- std over seeds of the last-epoch top-1 (the README's number is
the last epoch's too, its issue #16) with the README's number beside it. A cell the README leaves
empty (FSP on different types) is not run, nor FSP wrn_40_2-wrn_40_1, whose 0.00 is no result
(RepDistiller's FSP refuses that pair, as ifacd_distill.py does).

    python scripts/run_table.py repdistiller --seeds 0 1 2  # both tables: 13 pairs, every row
    python scripts/run_table.py repdistiller --methods kd crd \
        --pairs resnet32x4-resnet8x4 resnet32x4-ShuffleV1
    python scripts/run_table.py repdistiller --methods student crd --pairs vgg13-vgg8 \
        --dry_run                                           # the commands
The table trains its own teachers. RepDistiller publishes its teachers (its
scripts/fetch_pretrained_teachers.sh); a single run takes one as it is ({'model': state_dict}):
`python ifacd_distill.py --config
configs/ifacd_distill/repdistiller/resnet32x4-resnet8x4_crd.yaml --teacher_ckpt
save/models/resnet32x4_vanilla/ckpt_epoch_240.pth`.
"""
import argparse
import csv
import os
import statistics
import sys

from runs import ROOT, command, is_complete, launch, log_rows

CONFIGS = os.path.join(ROOT, "configs", "ifacd_distill")
PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20",
         "resnet32x4-resnet8x4", "resnet110-resnet20"]
# S000 top-1 (%), column order = PAIRS, rows in the slides' order (METHODS.md section 8; the slides'
# own "Average" cells are not repeated: two of them are not the row means).
SLIDES = {
    "teacher": [76.32, 76.32, 74.18, 72.79, 78.36, 73.76],
    "student": [71.12, 72.89, 70.16, 69, 72.21, 69],
    "kd": [75.77, 74.27, 72.63, 71.53, 75.34, 71.28],
    "hint": [75.09, 73.88, 73.95, 70.32, 75.05, 70.28],
    "attention": [75.31, 74.43, 73.51, 71.20, 75.76, 71.49],
    "similarity": [75.60, 74.30, 73.50, 71.44, 75.90, 71.03],
    "correlation": [75.40, 74.33, 72.98, 71.04, 75.78, 71.20],
    "vid": [75.26, 73.90, 73.29, 71.53, 75.72, 71.26],
    "rkd": [75.26, 74.06, 73.06, 71.18, 75.45, 70.78],
    "pkt": [75.70, 74.45, 73.23, 71.50, 75.60, 71.41],
    "nst": [75.70, 74.27, 72.87, 71.40, 75.52, 71.43],
    "crd": [75.74, 74.74, 73.28, 71.45, 76.13, 71.36],
    "ifacd1": [75.61, 74.25, 73.23, 71.53, 75.69, 71.26],
    "ifacd2": [75.76, 74.39, 73.23, 71.70, 75.78, 71.57],
    "ifacd3": [75.42, 73.89, 73.45, 71.70, 75.87, 71.42],
}

# the slides' "Accuracy Results Ours", vanilla rows last
ACCURACY_ROWS = ["attention", "correlation", "crd", "hint", "kd", "nst", "pkt", "rkd", "similarity",
                 "vid", "ifacd1", "ifacd2", "student", "teacher"]
LABELS = {"student": "Student vanilla", "teacher": "Teacher vanilla"}

# RepDistiller's README, "Benchmark Results on CIFAR-100": table 1 (teacher and student of the same
# architectural type) then table 2 (different types), the pairs in its column order; our model names
# (its mobile_half = MobileNetV2).
RD_SAME = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20",
           "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8"]
RD_DIFF = ["vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
           "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1"]
RD_PAIRS = RD_SAME + RD_DIFF
# Its top-1 (%), column order = RD_PAIRS (a row's first line: RD_SAME, its second: RD_DIFF), rows in
# its order; None = no cell (FSP on different types).
REPDISTILLER = {
    "teacher": [75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64,
                74.64, 79.34, 79.34, 79.42, 79.42, 75.61],
    "student": [73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36,
                64.60, 64.60, 70.36, 70.50, 71.82, 70.50],
    "kd": [74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98,
           67.37, 67.35, 73.81, 74.07, 74.45, 74.83],
    "hint": [73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02,
             64.14, 63.16, 70.69, 73.59, 73.54, 73.73],
    "attention": [74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43,
                  59.40, 58.58, 71.84, 71.73, 72.73, 73.32],
    "similarity": [73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68,
                   66.30, 68.08, 73.34, 73.48, 74.56, 74.52],
    "correlation": [73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71,
                    64.86, 65.43, 70.25, 71.14, 71.29, 71.38],
    "vid": [74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23,
            65.56, 67.57, 70.30, 73.38, 73.40, 73.61],
    "rkd": [73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48,
            64.52, 64.43, 71.50, 72.28, 73.21, 72.21],
    "pkt": [74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88,
            67.13, 66.52, 73.01, 74.10, 74.69, 73.89],
    "abound": [72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94,
               66.06, 67.20, 70.65, 73.55, 74.31, 73.34],
    "factor": [73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58,
               61.78, 60.99, 70.29, 71.75, 72.50, 72.03],
    "fsp": [72.91, 0.00, 69.95, 70.11, 71.89, 72.62, 70.23,
            None, None, None, None, None, None],
    "nst": [73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53,
            58.16, 64.96, 71.28, 74.12, 74.68, 74.89],
    "crd": [75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94,
            69.73, 69.11, 74.30, 75.11, 75.65, 76.05],
}
RD_LABELS = {"kd": "KD", "hint": "FitNet", "attention": "AT", "similarity": "SP",
             "correlation": "CC", "vid": "VID", "rkd": "RKD", "pkt": "PKT", "abound": "AB",
             "factor": "FT", "fsp": "FSP", "nst": "NST", "crd": "CRD"}
# README cells that are no result, marked * beside its number and not run (their configs exist, as
# the README's cells).
RD_FLAGGED = {("fsp", "wrn_40_2-wrn_40_1"):
              "the README prints 0.00: RepDistiller's FSP refuses the pair (channel counts differ, "
              "distiller_zoo/FSP.py), as ifacd_distill.py does; not run"}

# a table's configs, columns, reference numbers (their keys = its rows), cells not run, and output
# root
TABLES = {
    "ifacd": dict(configs=CONFIGS, pairs=PAIRS, reference=SLIDES, skip={},
                  out_root=os.path.join("out", "ifacd_distill"),
                  description="the IFACD slides' CIFAR-100 table"),
    "repdistiller": dict(configs=os.path.join(CONFIGS, "repdistiller"), pairs=RD_PAIRS,
                         reference=REPDISTILLER, skip=RD_FLAGGED,
                         out_root=os.path.join("out", "repdistiller"),
                         description="RepDistiller's CIFAR-100 benchmark (its README's two "
                                     "tables)"),
}


def parse_args(argv, table="ifacd"):
    spec = TABLES[table]
    p = argparse.ArgumentParser(prog=f"run_table.py {table}", description=spec["description"])
    rows = [m for m in spec["reference"] if m != "teacher"]
    p.add_argument("--methods", nargs="+", default=rows,
                   choices=rows if table == "repdistiller" else None,
                   help="rows to run (default: the whole table; the teachers are always trained)")
    p.add_argument("--pairs", nargs="+", default=spec["pairs"], choices=spec["pairs"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun --nproc_per_node)")
    p.add_argument("--out_root", default=spec["out_root"])
    p.add_argument("--dry_run", action="store_true",
                   help="print the commands instead of running them")
    p.set_defaults(table=table)
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def reference(table, method, pair):
    """The table's published number for (method, pair), None where it has none."""
    spec = TABLES[table]
    return spec["reference"].get(method, [None] * len(spec["pairs"]))[spec["pairs"].index(pair)]


def teacher_dir(out_root, teacher):
    return os.path.join(out_root, f"vanilla_{teacher}")


def plan(args, extra):
    """[(method, columns, seed, run_dir, command or None if complete)], teachers first, each model's
    vanilla run once: a teacher or vanilla student fills every column (pair) it belongs to. The
    configs are args.table's; a (method, pair) whose reference row exists but has no number there
    (RepDistiller's FSP on different types), or that the table skips (RD_FLAGGED), is not run."""
    spec, runs = TABLES[args.table], []
    configs = spec["configs"]
    vanilla = [("teacher", t, [p for p in args.pairs if p.split("-")[0] == t]) for t in
               dict.fromkeys(p.split("-")[0] for p in args.pairs)]
    if "student" in args.methods:
        vanilla += [("student", s, [p for p in args.pairs if p.split("-")[1] == s]) for s in
                    dict.fromkeys(p.split("-")[1] for p in args.pairs)]
    for method, model, columns in vanilla:
        for seed in [0] if method == "teacher" else args.seeds:  # teachers are trained once
            out = teacher_dir(args.out_root, model) if method == "teacher" else \
                os.path.join(args.out_root, f"vanilla_{model}", f"seed{seed}")
            cmd = command(os.path.join(configs, f"vanilla_{model}.yaml"), out, args.nproc, extra,
                          seed)
            runs.append((method, columns, seed, out, None if is_complete(out) else cmd))
    for method in [m for m in args.methods if m not in ("teacher", "student")]:
        for pair in args.pairs:
            if (method in spec["reference"] and reference(args.table, method, pair) is None) or \
                    (method, pair) in spec["skip"]:
                continue
            cfg_path = os.path.join(configs, f"{pair}_{method}.yaml")
            if not os.path.exists(cfg_path):
                raise SystemExit(f"no config {cfg_path} for method {method}")
            for seed in args.seeds:
                out = os.path.join(args.out_root, f"{pair}_{method}", f"seed{seed}")
                cmd = command(cfg_path, out, args.nproc, extra, seed,
                              teacher_dir(args.out_root, pair.split("-")[0]))
                runs.append((method, [pair], seed, out, None if is_complete(out) else cmd))
    return runs


def last_and_best(run_dir):
    """(last-epoch test top-1, best test top-1) from run_dir/log.jsonl, or None if it has no
    evaluated epoch."""
    rows = [r for r in log_rows(run_dir) if "test_top1" in r]
    return (rows[-1]["test_top1"], rows[-1]["best_test_top1"]) if rows else None


def collect(runs):
    """From the finished runs: ({(method, pair): [last-epoch top-1 per seed]}, {(method, pair):
    [last log row per seed]}, the results.csv rows)."""
    results, logs, rows = {}, {}, []
    for method, columns, seed, out, cmd in runs:
        acc = last_and_best(out) if cmd is None else None
        if acc is not None:
            rows.append([method, " ".join(columns), seed, f"{acc[0]:.2f}", f"{acc[1]:.2f}", out])
            # read once: a teacher or vanilla run fills several columns
            last = {**log_rows(out)[-1], "top1": acc[0]}
            for pair in columns:
                results.setdefault((method, pair), []).append(acc[0])
                logs.setdefault((method, pair), []).append(last)
    return results, logs, rows


def spread(accs):
    """A cell: mean +- std over the seeds' top-1, and their number ("-" without a finished run)."""
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.2f} ± {std:.2f} (n={len(accs)})" if accs else "-"


def summarise(args, runs, write=True):
    """results.csv (every finished run) and results.md, laid out as args.table's source
    (ifacd_lines, repdistiller_lines). Returns the Markdown lines."""
    results, logs, rows = collect(runs)
    if args.table == "ifacd":
        title = ("CIFAR-100 test top-1 (%) of the last epoch, mean ± std over seeds; [slides] = "
                 "S000.\n\n")
        lines = ifacd_lines(args, results, logs)
    else:
        title = ("CIFAR-100 test top-1 (%) of the last epoch, mean ± std over seeds (n = finished "
                 "runs); [RepDistiller] = its README's number (github.com/HobbitLong/RepDistiller, "
                 "\"Benchmark Results on CIFAR-100\", also the last epoch: its issue #16).\n")
        lines = repdistiller_lines(args, results)
    if write:
        os.makedirs(args.out_root, exist_ok=True)
        with open(os.path.join(args.out_root, "results.csv"), "w", newline="") as f:
            csv.writer(f).writerows([["method", "pairs", "seed", "last_top1", "best_top1",
                                      "run_dir"]] + rows)
        with open(os.path.join(args.out_root, "results.md"), "w") as f:
            f.write(title + "\n".join(lines) + "\n")
    return lines


def ifacd_lines(args, results, logs):
    """methods x pairs: mean +- std of the last-epoch top-1, the slides' number in brackets, and the
    average over the pairs; then slides_tables."""
    lines = ["| method | " + " | ".join(args.pairs) + " | avg |",
             "|---" * (len(args.pairs) + 2) + "|"]
    for method in ["teacher", "student"] + [m for m in args.methods
                                            if m not in ("teacher", "student")]:
        cells, means = [], []
        slides = [reference("ifacd", method, p) for p in args.pairs]
        for pair, ref in zip(args.pairs, slides):
            accs = results.get((method, pair), [])
            means += [statistics.mean(accs)] if accs else []
            cells.append(spread(accs) + f" [slides {ref}]")
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(args.pairs) else "-"
        ref = f"{statistics.mean(slides):.2f}" if None not in slides else None
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} [slides {ref}] |")
    return lines + slides_tables(args, logs)


def rd_reference(method, pair):
    """RepDistiller's number as shown beside ours: 2 decimals, * if RD_FLAGGED."""
    return (f"{reference('repdistiller', method, pair):.2f}"
            + ("*" if (method, pair) in RD_FLAGGED else ""))


def repdistiller_lines(args, results):
    """RepDistiller's README tables: the same-type pairs, then the different-type ones (the
    requested pairs, in the README's order); a "Teacher / Student" row (teacher / student trained
    alone), then the requested methods in the README's order with its labels (a table shows a
    method only where the README has it: no FSP on different types).
    Each cell: ours, then [RepDistiller its number]; a note below for each flagged cell shown."""
    lines = []
    for caption, table in (("Teacher and student of the same architectural type (README table 1).",
                            RD_SAME),
                           ("Teacher and student of different architectural types (README table "
                            "2).", RD_DIFF)):
        pairs = [p for p in table if p in args.pairs]
        if not pairs:
            continue
        body = ["| Teacher / Student | " + " | ".join(
            f"{spread(results.get(('teacher', p), []))} / "
            f"{spread(results.get(('student', p), []))} "
            f"[RepDistiller {rd_reference('teacher', p)} / {rd_reference('student', p)}]"
            for p in pairs) + " |"]
        for method in [m for m in RD_LABELS if m in args.methods]:
            if any(reference("repdistiller", method, p) is not None for p in table):
                body.append(f"| {RD_LABELS[method]} | " + " | ".join(
                    f"{spread(results.get((method, p), []))} "
                    f"[RepDistiller {rd_reference(method, p)}]" for p in pairs)
                    + " |")
        head = ("| Teacher <br> Student | " + " | ".join(p.replace("-", " <br> ") for p in pairs)
                + " |")
        lines += ["", caption, "", head, "|---" * (len(pairs) + 1) + "|"] + body
    notes = [f"* {RD_LABELS[m]} {p.replace('-', ' → ')}: {why}."
             for (m, p), why in RD_FLAGGED.items() if m in args.methods and p in args.pairs]
    return lines + ([""] + notes if notes else [])


def cell(rows, key, scale=1.0, gpu_only=False):
    """Mean over seeds of key x scale in the runs' last log rows (None without a finished run).
    gpu_only (memory, time): only the runs made on CUDA count (their logs have
    peak_mem_reserved_gb), "cpu" if there are none."""
    gpu = [r for r in rows if "peak_mem_reserved_gb" in r]
    if gpu_only and rows and not gpu:
        return "cpu"
    values = [r[key] * scale for r in (gpu if gpu_only else rows) if key in r]
    return statistics.mean(values) if values else None


def with_average(values):
    """A row's cells plus its Average: the mean over the pairs when each has a number, else "cpu" or
    None."""
    if all(isinstance(v, float) for v in values):
        return values + [statistics.mean(values)]
    return values + ["cpu" if all(v == "cpu" for v in values) else None]


def fmt(value):
    return f"{value:.2f}" if isinstance(value, float) else (value or "-")


def mark(value, base):
    """The ablation's arrows against ifacd1, at the precision shown (the slides mark nothing when
    equal)."""
    if not (isinstance(value, float) and isinstance(base, float)) \
            or round(value, 2) == round(base, 2):
        return ""
    return "↑" if value > base else "↓"


def markdown(caption, pairs, rows):
    """A caption and its table (nothing without rows): rows = [(label, cells)], a cell per pair,
    then the Average."""
    head = "| Method | " + " | ".join(p.replace("-", " → ") for p in pairs) + " | Average |"
    body = [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return ["", caption, "", head, "|---" * (len(pairs) + 2) + "|"] + body if rows else []


def slides_tables(args, logs):
    """The slides' tables from logs ((method, pair) -> the runs' last log rows): the requested rows
    in the slides' order (accuracy: ACCURACY_ROWS; memory, parameters, time: alphabetical), the
    pairs in the slides' order."""
    pairs, asked = [p for p in PAIRS if p in args.pairs], ["teacher"] + list(args.methods)

    def values(method, key, scale=1.0, gpu_only=False):
        return with_average([cell(logs.get((method, p), []), key, scale, gpu_only) for p in pairs])

    rows = [(LABELS.get(m, m), list(map(fmt, values(m, "top1")))) for m in ACCURACY_ROWS
            if m in asked]
    lines = markdown("Top-1 (%) on CIFAR-100, last epoch, mean over seeds, as the slides' "
                     "\"Accuracy Results Ours\" (Average = mean over the pairs).", pairs, rows)
    base = values("ifacd1", "top1")
    rows = [(m, [fmt(v) + mark(v, b) for v, b in zip(values(m, "top1"), base)])
            for m in ("ifacd1", "ifacd2", "ifacd3") if m in asked]
    lines += markdown("Intermediate features ablation: top-1 (%) with the teacher's last 1, 2 or 3 "
                      "layers; ↑ / ↓ = above / below ifacd1.", pairs, rows)
    costs = sorted(m for m in asked if m not in ("teacher", "student"))
    rows = [(m, list(map(fmt, values(m, "peak_mem_reserved_gb", gpu_only=True)))) for m in costs]
    lines += markdown("Memory (GB): torch.cuda.max_memory_reserved over the whole run, mean over "
                      "seeds; cpu = run on the CPU (the slides' Average repeats their first "
                      "column; ours is the mean).", pairs, rows)
    rows = [(m, list(map(fmt, values(m, "params_slides", 1e-6)))) for m in costs]
    lines += markdown("Parameters (M): teacher + student + distillation heads, CRD's and IFACD's "
                      "heads counted twice, as the slides count them.", pairs, rows)
    rows = [(m, list(map(fmt, values(m, "train_time_s", 1 / 3600, gpu_only=True)))) for m in costs]
    return lines + markdown("Training time (hours; the slides do not state their unit): wall clock "
                            "of training + testing over the whole run, mean over seeds; cpu = run "
                            "on the CPU.", pairs, rows)


def run_table(argv, table):
    """Plan the runs of a table, launch the unfinished ones (teachers first), then summarise."""
    args, extra = parse_args(argv, table)
    runs = plan(args, extra)
    for method, columns, seed, out, cmd in runs:
        if cmd is None:
            print(f"# done: {method} seed {seed} ({out})")
        else:
            launch(cmd, args.dry_run)
    if not args.dry_run:
        runs = [r[:4] + (None if is_complete(r[3]) else r[4],) for r in runs]
    print("\n".join(summarise(args, runs, write=not args.dry_run)))


NAMES = {  # every table this entry point runs, and the module that runs it
    "ifacd": ("the IFACD slides' CIFAR-100 table", "run_table"),
    "repdistiller": ("RepDistiller's CIFAR-100 benchmark (its README's two tables)", "run_table"),
    "fashion_mnist": ("every SSL method on Fashion-MNIST on a CPU", "fashion_mnist"),
    "fashion_mnist_distill": ("its distillation rows", "fashion_mnist"),
    "claims": ("each paper's headline claim, reproduced or not, on Fashion-MNIST", "claims"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # no table name: the IFACD table, as before tables had names
    if not argv or argv[0].startswith("-"):
        argv = ["ifacd"] + argv
    if argv[0] not in NAMES:
        raise SystemExit(f"usage: run_table.py {{{','.join(NAMES)}}} [options] "
                         f"[-- flags for every run]; "
                         + ", ".join(f"{name} = {what}" for name, (what, _) in NAMES.items()))
    if argv[0] in TABLES:
        return run_table(argv[1:], argv[0])
    import importlib
    # scripts/fashion_mnist.py, claims.py
    importlib.import_module(NAMES[argv[0]][1]).main(argv[1:], argv[0])


if __name__ == "__main__":
    main()
