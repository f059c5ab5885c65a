"""The benchmark tables, one entry point: `python scripts/run_table.py TABLE [options] [-- flags for every run]`.

    ifacd                   the IFACD slides' CIFAR-100 distillation table (S000), with ifacd_distill.py (this file;
                            also what runs when TABLE is left out)
    fashion_mnist           every SSL method on Fashion-MNIST on a CPU, with its baselines (scripts/fashion_mnist.py)
    fashion_mnist_distill   its distillation rows: resnet56 teacher, resnet20 alone / KD / CRD / IFACD

Runs already finished are skipped (a last.pt that reached its final epoch); an unfinished one is relaunched and
resumes on its own (auto-resume). This script only launches processes and reads what they write; it never imports
torch unless a last.pt exists.

The IFACD table trains every teacher the requested pairs need once (configs/ifacd_distill/vanilla_<teacher>.yaml,
seed 0), then runs each (method, pair, seed) and writes OUT/results.csv (one line per run: last-epoch and best test
top-1) and OUT/results.md: the mean +- std over seeds of the last-epoch top-1 with the slides' number beside it, then
the slides' own tables from the runs' log.jsonl, in their layout: accuracy (and the ifacd1/2/3 ablation with its
arrows), memory (peak_mem_reserved_gb), parameters (params_slides) and training time (train_time_s, in hours); runs
made on the CPU say "cpu" in the memory and time tables.

    python scripts/run_table.py ifacd --seeds 0 1 2 --nproc 1                  # the whole table: every row, six pairs
    python scripts/run_table.py ifacd --methods kd crd ifacd1 ifacd2 ifacd3 --seeds 0 1 2      # some rows
    python scripts/run_table.py ifacd --methods student ifacd2 --pairs resnet56-resnet20 --dry_run   # the commands
    python scripts/run_table.py ifacd --methods kd --seeds 0 -- --data_dir /data --num_workers 4  # flags for every run
Methods: `teacher` and `student` (the vanilla rows), or any configs/ifacd_distill/<teacher>-<student>_<method>.yaml
(the table's: kd, hint, attention, similarity, correlation, vid, rkd, pkt, nst, crd, ifacd1, ifacd2, ifacd3).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "ifacd_distill")
PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "resnet110-resnet20"]
# S000 top-1 (%), column order = PAIRS, rows in the slides' order (METHODS.md section 8; the slides' own "Average"
# cells are not repeated: two of them are not the row means).
SLIDES = {
    "teacher": [76.32, 76.32, 74.18, 72.79, 78.36, 73.76], "student": [71.12, 72.89, 70.16, 69, 72.21, 69],
    "kd": [75.77, 74.27, 72.63, 71.53, 75.34, 71.28], "hint": [75.09, 73.88, 73.95, 70.32, 75.05, 70.28],
    "attention": [75.31, 74.43, 73.51, 71.20, 75.76, 71.49], "similarity": [75.60, 74.30, 73.50, 71.44, 75.90, 71.03],
    "correlation": [75.40, 74.33, 72.98, 71.04, 75.78, 71.20], "vid": [75.26, 73.90, 73.29, 71.53, 75.72, 71.26],
    "rkd": [75.26, 74.06, 73.06, 71.18, 75.45, 70.78], "pkt": [75.70, 74.45, 73.23, 71.50, 75.60, 71.41],
    "nst": [75.70, 74.27, 72.87, 71.40, 75.52, 71.43], "crd": [75.74, 74.74, 73.28, 71.45, 76.13, 71.36],
    "ifacd1": [75.61, 74.25, 73.23, 71.53, 75.69, 71.26], "ifacd2": [75.76, 74.39, 73.23, 71.70, 75.78, 71.57],
    "ifacd3": [75.42, 73.89, 73.45, 71.70, 75.87, 71.42],
}

ACCURACY_ROWS = ["attention", "correlation", "crd", "hint", "kd", "nst", "pkt", "rkd", "similarity", "vid", "ifacd1",
                 "ifacd2", "student", "teacher"]  # the slides' "Accuracy Results Ours", vanilla rows last
LABELS = {"student": "Student vanilla", "teacher": "Teacher vanilla"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run_table.py ifacd", description="the IFACD slides' CIFAR-100 table")
    p.add_argument("--methods", nargs="+", default=[m for m in SLIDES if m != "teacher"],
                   help="rows to run (default: the whole table; the teachers are always trained)")
    p.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun --nproc_per_node)")
    p.add_argument("--out_root", default=os.path.join("out", "ifacd_distill"))
    p.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def teacher_dir(out_root, teacher):
    return os.path.join(out_root, f"vanilla_{teacher}")


def is_complete(run_dir):
    """True if run_dir/last.pt reached the last epoch of its own config."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return False
    sys.path.insert(0, ROOT)
    from common import checkpoint  # imported only here: torch is slow to import and dry runs rarely need it
    blob = checkpoint.load(path)
    return blob["epoch"] >= blob["config"]["epochs"]


def command(cfg_path, run_dir, nproc, extra, seed=None, teacher_ckpt=None, script="ifacd_distill.py"):
    """The launch of one run: torchrun with nproc processes (plain python for nproc 0)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *launcher, os.path.join(ROOT, script), "--config", cfg_path, "--output_dir", run_dir]
    cmd += ["--seed", str(seed)] if seed is not None else []
    cmd += ["--teacher_ckpt", os.path.join(teacher_ckpt, "last.pt")] if teacher_ckpt else []
    return cmd + extra


def plan(args, extra):
    """[(method, columns, seed, run_dir, command or None if complete)], teachers first, each model's vanilla run
    once: a teacher or vanilla student fills every column (pair) it belongs to."""
    runs = []
    vanilla = [("teacher", t, [p for p in args.pairs if p.split("-")[0] == t]) for t in
               dict.fromkeys(p.split("-")[0] for p in args.pairs)]
    if "student" in args.methods:
        vanilla += [("student", s, [p for p in args.pairs if p.split("-")[1] == s]) for s in
                    dict.fromkeys(p.split("-")[1] for p in args.pairs)]
    for method, model, columns in vanilla:
        for seed in [0] if method == "teacher" else args.seeds:  # teachers are trained once
            out = teacher_dir(args.out_root, model) if method == "teacher" else \
                os.path.join(args.out_root, f"vanilla_{model}", f"seed{seed}")
            cmd = command(os.path.join(CONFIGS, f"vanilla_{model}.yaml"), out, args.nproc, extra, seed)
            runs.append((method, columns, seed, out, None if is_complete(out) else cmd))
    for method in [m for m in args.methods if m not in ("teacher", "student")]:
        for pair in args.pairs:
            cfg_path = os.path.join(CONFIGS, f"{pair}_{method}.yaml")
            if not os.path.exists(cfg_path):
                raise SystemExit(f"no config {cfg_path} for method {method}")
            for seed in args.seeds:
                out = os.path.join(args.out_root, f"{pair}_{method}", f"seed{seed}")
                cmd = command(cfg_path, out, args.nproc, extra, seed, teacher_dir(args.out_root, pair.split("-")[0]))
                runs.append((method, [pair], seed, out, None if is_complete(out) else cmd))
    return runs


def log_rows(run_dir):
    """The rows of run_dir/log.jsonl (none if it does not exist)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def last_and_best(run_dir):
    """(last-epoch test top-1, best test top-1) from run_dir/log.jsonl, or None if it has no evaluated epoch."""
    rows = [r for r in log_rows(run_dir) if "test_top1" in r]
    return (rows[-1]["test_top1"], rows[-1]["best_test_top1"]) if rows else None


def summarise(args, runs, write=True):
    """results.csv (every finished run) and results.md (methods x pairs: mean +- std of the last-epoch top-1, the
    slides' number in brackets, and the average over the pairs; then slides_tables). Returns the Markdown lines."""
    results, logs, rows = {}, {}, []  # (method, pair) -> [last-epoch top-1 per seed], [last log row per seed]
    for method, columns, seed, out, cmd in runs:
        acc = last_and_best(out) if cmd is None else None
        if acc is not None:
            rows.append([method, " ".join(columns), seed, f"{acc[0]:.2f}", f"{acc[1]:.2f}", out])
            last = {**log_rows(out)[-1], "top1": acc[0]}  # read once: a teacher or vanilla run fills several columns
            for pair in columns:
                results.setdefault((method, pair), []).append(acc[0])
                logs.setdefault((method, pair), []).append(last)
    lines = ["| method | " + " | ".join(args.pairs) + " | avg |", "|---" * (len(args.pairs) + 2) + "|"]
    for method in ["teacher", "student"] + [m for m in args.methods if m not in ("teacher", "student")]:
        cells, means = [], []
        slides = [SLIDES.get(method, [None] * len(PAIRS))[PAIRS.index(p)] for p in args.pairs]
        for pair, ref in zip(args.pairs, slides):
            accs = results.get((method, pair), [])
            means += [statistics.mean(accs)] if accs else []
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append((f"{means[-1]:.2f} ± {std:.2f} (n={len(accs)})" if accs else "-") + f" [slides {ref}]")
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(args.pairs) else "-"
        ref = f"{statistics.mean(slides):.2f}" if None not in slides else None
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} [slides {ref}] |")
    lines += slides_tables(args, logs)
    if write:
        os.makedirs(args.out_root, exist_ok=True)
        with open(os.path.join(args.out_root, "results.csv"), "w", newline="") as f:
            csv.writer(f).writerows([["method", "pairs", "seed", "last_top1", "best_top1", "run_dir"]] + rows)
        with open(os.path.join(args.out_root, "results.md"), "w") as f:
            f.write("CIFAR-100 test top-1 (%) of the last epoch, mean ± std over seeds; [slides] = S000.\n\n"
                    + "\n".join(lines) + "\n")
    return lines


def cell(rows, key, scale=1.0, gpu_only=False):
    """Mean over seeds of key x scale in the runs' last log rows (None without a finished run). gpu_only (memory,
    time): only the runs made on CUDA count (their logs have peak_mem_reserved_gb), "cpu" if there are none."""
    gpu = [r for r in rows if "peak_mem_reserved_gb" in r]
    if gpu_only and rows and not gpu:
        return "cpu"
    values = [r[key] * scale for r in (gpu if gpu_only else rows) if key in r]
    return statistics.mean(values) if values else None


def with_average(values):
    """A row's cells plus its Average: the mean over the pairs when each has a number, else "cpu" or None."""
    if all(isinstance(v, float) for v in values):
        return values + [statistics.mean(values)]
    return values + ["cpu" if all(v == "cpu" for v in values) else None]


def fmt(value):
    return f"{value:.2f}" if isinstance(value, float) else (value or "-")


def mark(value, base):
    """The ablation's arrows against ifacd1, at the precision shown (the slides mark nothing when equal)."""
    if not (isinstance(value, float) and isinstance(base, float)) or round(value, 2) == round(base, 2):
        return ""
    return "↑" if value > base else "↓"


def markdown(caption, pairs, rows):
    """A caption and its table (nothing without rows): rows = [(label, cells)], a cell per pair, then the Average."""
    head = "| Method | " + " | ".join(p.replace("-", " → ") for p in pairs) + " | Average |"
    body = [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return ["", caption, "", head, "|---" * (len(pairs) + 2) + "|"] + body if rows else []


def slides_tables(args, logs):
    """The slides' tables from logs ((method, pair) -> the runs' last log rows): the requested rows in the slides'
    order (accuracy: ACCURACY_ROWS; memory, parameters, time: alphabetical), the pairs in the slides' order."""
    pairs, asked = [p for p in PAIRS if p in args.pairs], ["teacher"] + list(args.methods)

    def values(method, key, scale=1.0, gpu_only=False):
        return with_average([cell(logs.get((method, p), []), key, scale, gpu_only) for p in pairs])

    rows = [(LABELS.get(m, m), list(map(fmt, values(m, "top1")))) for m in ACCURACY_ROWS if m in asked]
    lines = markdown("Top-1 (%) on CIFAR-100, last epoch, mean over seeds, as the slides' \"Accuracy Results Ours\" "
                     "(Average = mean over the pairs).", pairs, rows)
    base = values("ifacd1", "top1")
    rows = [(m, [fmt(v) + mark(v, b) for v, b in zip(values(m, "top1"), base)])
            for m in ("ifacd1", "ifacd2", "ifacd3") if m in asked]
    lines += markdown("Intermediate features ablation: top-1 (%) with the teacher's last 1, 2 or 3 layers; ↑ / ↓ = "
                      "above / below ifacd1.", pairs, rows)
    costs = sorted(m for m in asked if m not in ("teacher", "student"))
    rows = [(m, list(map(fmt, values(m, "peak_mem_reserved_gb", gpu_only=True)))) for m in costs]
    lines += markdown("Memory (GB): torch.cuda.max_memory_reserved over the whole run, mean over seeds; cpu = run on "
                      "the CPU (the slides' Average repeats their first column; ours is the mean).", pairs, rows)
    rows = [(m, list(map(fmt, values(m, "params_slides", 1e-6)))) for m in costs]
    lines += markdown("Parameters (M): teacher + student + distillation heads, CRD's and IFACD's heads counted twice, "
                      "as the slides count them.", pairs, rows)
    rows = [(m, list(map(fmt, values(m, "train_time_s", 1 / 3600, gpu_only=True)))) for m in costs]
    return lines + markdown("Training time (hours; the slides do not state their unit): wall clock of training + "
                            "testing over the whole run, mean over seeds; cpu = run on the CPU.", pairs, rows)


def launch(cmd, dry_run):
    """Run one process to its end (or print it for a dry run); returns its wall time in seconds (0 for a dry run)."""
    if dry_run:
        print(" ".join(cmd))
        return 0.0
    print(f"# running: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def ifacd_table(argv):
    args, extra = parse_args(argv)
    runs = plan(args, extra)
    for method, columns, seed, out, cmd in runs:
        if cmd is None:
            print(f"# done: {method} seed {seed} ({out})")
        else:
            launch(cmd, args.dry_run)
    if not args.dry_run:
        runs = [r[:4] + (None if is_complete(r[3]) else r[4],) for r in runs]
    print("\n".join(summarise(args, runs, write=not args.dry_run)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):  # no table name: the IFACD table, as before tables had names
        argv = ["ifacd"] + argv
    if argv[0] not in ("ifacd", "fashion_mnist", "fashion_mnist_distill"):
        raise SystemExit("usage: run_table.py {ifacd,fashion_mnist,fashion_mnist_distill} [options] [-- flags for every "
                         "run]; ifacd = the IFACD slides' CIFAR-100 table, fashion_mnist = every SSL method on "
                         "Fashion-MNIST on a CPU, fashion_mnist_distill = its distillation rows")
    if argv[0] == "ifacd":
        return ifacd_table(argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fashion_mnist  # scripts/fashion_mnist.py
    fashion_mnist.main(argv[1:], argv[0])


if __name__ == "__main__":
    main()
