"""The Fashion-MNIST tables: does every method learn on real images, on a laptop CPU?

`run_table.py fashion_mnist`: each self-supervised row trains with its CPU recipe (configs/<method>/
fashion_mnist_cpu*.yaml: a small backbone, a few minutes), then its final online/student backbone is
evaluated on frozen features (eval/frozen.py: weighted 20-NN and 200-NN with the 60k training images
as neighbours, and a linear probe), next to two baselines evaluated the same way: the same
architecture at random init, and raw pixels.
`run_table.py fashion_mnist_distill`: a resnet56 teacher, then resnet20 students alone, with KD,
CRD, IFACD, AB, FT, FSP and KDSVD, and the cross-family students MobileNetV2 (alone, KD, FT) and
ShuffleV1 (alone) (ifacd_distill.py, configs/ifacd_distill/fashion_mnist_*.yaml), reporting test
top-1 and the gain over the same student trained alone.
Two tables because on two cores the teacher alone trains for about 40-50 minutes (4.5 passes over
the images: 91.6% test top-1).

    python scripts/run_table.py fashion_mnist                 # one seed, every SSL row
                                                              # (under an hour on 2 cores)
    python scripts/run_table.py fashion_mnist \
        --data_dir /usr/share/datasets/fashion-mnist          # Debian's idx files
    python scripts/run_table.py fashion_mnist --seeds 0 1 2 --rows simclr byol --out_root out/fm
    python scripts/run_table.py fashion_mnist_distill         # the teacher and every student
    python scripts/run_table.py fashion_mnist --dry_run \
        -- --device cpu                                       # print the commands (flags for all)

Writes OUT/results.md (the table, the machine, the per-run wall time), OUT/results.csv (one line per
run) and, for the SSL table, OUT/curves.png (eval/plot.py: the loss and the training-time k-NN
monitor's top-1 per epoch, every row; needs matplotlib, otherwise only OUT/curves.json). Finished
runs and evaluations are skipped, so an interrupted table continues.
"""
import argparse
import json
import os
import statistics
import sys

import yaml

from runs import ROOT, command, is_complete, log_rows, machine, read_json, timed

SSL_ROWS = {  # key: (the table's name for it, script, config under configs/)
    "simclr": ("SimCLR", "simclr.py", "simclr/fashion_mnist_cpu"),
    "mocov3": ("MoCo v3", "mocov3.py", "mocov3/fashion_mnist_cpu"),
    "byol": ("BYOL", "byol.py", "byol/fashion_mnist_cpu"),
    "simsiam": ("SimSiam", "simsiam_gsg.py", "simsiam_gsg/fashion_mnist_cpu_simsiam"),
    "simsiam_gsg": ("SimSiam + GSG", "simsiam_gsg.py", "simsiam_gsg/fashion_mnist_cpu_simsiam_gsg"),
    "byol_gsg": ("BYOL + GSG", "simsiam_gsg.py", "simsiam_gsg/fashion_mnist_cpu_byol_gsg"),
    "msbreg": ("MSBReg (K = 4)", "msbreg.py", "msbreg/fashion_mnist_cpu"),
    "mocov3_vit": ("MoCo v3 (ViT, SDSSL's baseline)", "sdssl.py", "sdssl/fashion_mnist_cpu_plain"),
    "sd_mocov3_vit": ("SD-MoCo v3 (ViT)", "sdssl.py", "sdssl/fashion_mnist_cpu"),
    "ifaclr": ("IFACLR (simlwclr, ViT)", "ifaclr.py", "ifaclr/fashion_mnist_cpu"),
}
# key: (name, config under configs/ifacd_distill/); the teacher comes first, trained once
DISTILL_ROWS = {
    "teacher": ("teacher resnet56", "fashion_mnist_teacher_resnet56"),
    "vanilla": ("resnet20 alone", "fashion_mnist_resnet20_vanilla"),
    "kd": ("resnet20 + KD", "fashion_mnist_resnet56-resnet20_kd"),
    "crd": ("resnet20 + CRD", "fashion_mnist_resnet56-resnet20_crd"),
    "ifacd1": ("resnet20 + IFACD (ifacd1)", "fashion_mnist_resnet56-resnet20_ifacd1"),
    "abound": ("resnet20 + AB", "fashion_mnist_resnet56-resnet20_abound"),
    "factor": ("resnet20 + FT", "fashion_mnist_resnet56-resnet20_factor"),
    "fsp": ("resnet20 + FSP", "fashion_mnist_resnet56-resnet20_fsp"),
    "kdsvd": ("resnet20 + KDSVD", "fashion_mnist_resnet56-resnet20_kdsvd"),
    # cross-family students
    "mobilenetv2": ("MobileNetV2 alone", "fashion_mnist_MobileNetV2_vanilla"),
    "mobilenetv2_kd": ("MobileNetV2 + KD", "fashion_mnist_resnet56-MobileNetV2_kd"),
    "mobilenetv2_factor": ("MobileNetV2 + FT", "fashion_mnist_resnet56-MobileNetV2_factor"),
    # no AB: its 4x4 maps vs the teacher's 7x7
    "shufflev1": ("ShuffleV1 alone", "fashion_mnist_ShuffleV1_vanilla"),
}


def parse_args(argv, table):
    rows = list(DISTILL_ROWS if table == "fashion_mnist_distill" else SSL_ROWS)
    p = argparse.ArgumentParser(prog=f"run_table.py {table}", description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=rows, choices=rows,
                   help="rows to run (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data_dir", default="./data",
                   help="Fashion-MNIST's idx files (downloaded there if missing)")
    p.add_argument("--linear_epochs", type=int, default=30,
                   help="epochs of the linear probe on frozen features")
    p.add_argument("--out_root", default=os.path.join("out", table))
    p.add_argument("--dry_run", action="store_true",
                   help="print the commands instead of running them")
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def recipe(config):
    with open(os.path.join(ROOT, "configs", config + ".yaml")) as f:
        return yaml.safe_load(f)


def backbone_key(cfg):
    """The random-init baseline a row is compared with: its arch (and ViT patch / heads)."""
    return cfg["arch"] + (f"_p{cfg['patch_size']}_h{cfg.get('num_heads', 0)}"
                          if cfg["arch"].startswith("vit") else "")


def evaluate(run_dir, eval_args, args):
    """eval/frozen.py into run_dir/eval.json, unless it is there already."""
    path = os.path.join(run_dir, "eval.json")
    if os.path.exists(path):
        return
    if not args.dry_run:
        os.makedirs(run_dir, exist_ok=True)  # eval.frozen writes the JSON there
    cmd = [sys.executable, "-m", "eval.frozen", *eval_args, "--data_dir", args.data_dir, "--json",
           path, "--linear_epochs", str(args.linear_epochs)]
    timed(cmd, run_dir, "eval_s", args.dry_run)


def run_all(args, extra):
    """Every requested run and evaluation, in the table's order; returns nothing (everything is on
    disk)."""
    ssl = [k for k in SSL_ROWS if k in args.rows]
    distill = [k for k in DISTILL_ROWS if k in args.rows]
    data = ["--data_dir", args.data_dir]
    for key in ssl:
        name, script, config = SSL_ROWS[key]
        for seed in args.seeds:
            out = os.path.join(args.out_root, key, f"seed{seed}")
            if not is_complete(out):
                cmd = command(os.path.join(ROOT, "configs", config + ".yaml"), out, 0, data + extra,
                              seed, script=script)
                timed(cmd, out, "train_s", args.dry_run)
            # the online/student network, also for SDSSL (whose paper evaluates the EMA teacher:
            # --which auto): after a few hundred steps the teacher (momentum 0.996 -> 1) still lags
            # far behind the network that learns
            evaluate(out, ["--checkpoint", os.path.join(out, "last.pt"), "--which", "model"], args)
    for cfg in {backbone_key(cfg): cfg for cfg in (recipe(SSL_ROWS[k][2]) for k in ssl)}.values():
        for seed in args.seeds:  # the same architecture at random init, seeded as the row
            flags = ["--arch", cfg["arch"], "--patch_size", str(cfg.get("patch_size", 16)),
                     "--num_heads", str(cfg.get("num_heads", 0)), "--seed", str(seed)]
            evaluate(os.path.join(args.out_root, "baselines", backbone_key(cfg), f"seed{seed}"),
                     flags + ["--dataset", "fashion_mnist"], args)
    if ssl:
        evaluate(os.path.join(args.out_root, "baselines", "pixels"),
                 ["--arch", "pixels", "--dataset", "fashion_mnist"], args)
    teacher = os.path.join(args.out_root, "teacher")
    for key in distill_rows(args) if distill else []:
        config = os.path.join(ROOT, "configs", "ifacd_distill", DISTILL_ROWS[key][1] + ".yaml")
        for seed in [0] if key == "teacher" else args.seeds:
            out = teacher if key == "teacher" else os.path.join(args.out_root, key, f"seed{seed}")
            if not is_complete(out):
                ckpt = (None if recipe("ifacd_distill/" + DISTILL_ROWS[key][1])["distill"] == "none"
                        else teacher)
                timed(command(config, out, 0, data + extra, seed, ckpt), out, "train_s",
                      args.dry_run)


def distill_rows(args):
    """The requested distillation rows in the table's order, the teacher always first: the students
    need it."""
    return ["teacher"] + [k for k in DISTILL_ROWS if k in args.rows and k != "teacher"]


# ------------------------------------------- the report -------------------------------------------

def mean_std(values, fmt="{:.2f}"):
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def throughput(rows):
    """(img/s averaged over epochs, peak memory in GB and what it measures) from a run's log
    rows."""
    ips = statistics.mean(r["img_per_s"] for r in rows) if rows else None
    mem = [r.get("peak_mem_gb", r.get("peak_rss_gb")) for r in rows]
    kind = "GPU" if rows and "peak_mem_gb" in rows[-1] else "RSS"
    return ips, (max(mem) if mem else None), kind


def ssl_table(args):
    """Markdown lines of the SSL table and the CSV rows; every number from the runs' files."""
    ssl = [k for k in SSL_ROWS if k in args.rows]
    pixels = read_json(os.path.join(args.out_root, "baselines", "pixels", "eval.json")) or {}
    lines = ["| method | backbone | 20-NN | 200-NN | linear | 20-NN vs random init | "
             "20-NN vs raw pixels | train (min) | img/s | peak memory (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    csv, baselines = [], {}
    for key in ssl:
        name, _, config = SSL_ROWS[key]
        cfg = recipe(config)
        base = backbone_key(cfg)
        runs = [os.path.join(args.out_root, key, f"seed{s}") for s in args.seeds]
        evals = [read_json(os.path.join(r, "eval.json")) for r in runs]
        rand = [read_json(os.path.join(args.out_root, "baselines", base, f"seed{s}", "eval.json"))
                for s in args.seeds]
        baselines[base] = [r for r in rand if r]
        done = [(e, r, run) for e, r, run in zip(evals, rand, runs) if e]
        k20 = [e["knn_top1_k20"] for e, _, _ in done]
        delta = [e["knn_top1_k20"] - r["knn_top1_k20"] for e, r, _ in done if r]
        vs_pixels = [v - pixels["knn_top1_k20"] for v in k20] if pixels else []
        minutes = [(read_json(os.path.join(run, "time.json")) or {}).get("train_s", 0) / 60
                   for _, _, run in done]
        ips, mem, kind = throughput(log_rows(runs[0]))
        lines.append(f"| {name} | {base} | {mean_std(k20)} | "
                     f"{mean_std([e['knn_top1_k200'] for e, _, _ in done])} | "
                     f"{mean_std([e['linear_top1'] for e, _, _ in done])} | "
                     f"{mean_std(delta, '{:+.2f}')} | "
                     f"{mean_std(vs_pixels, '{:+.2f}')} | {mean_std(minutes, '{:.1f}')} | "
                     f"{f'{ips:.0f}' if ips else '-'} | {f'{mem:.2f} ({kind})' if mem else '-'} |")
        csv += [[key, s, e["knn_top1_k20"], e["knn_top1_k200"], e["linear_top1"]]
                for s, e in zip(args.seeds, evals) if e]
    for base, results in baselines.items():
        lines.append(f"| random init | {base} | {mean_std([r['knn_top1_k20'] for r in results])} | "
                     f"{mean_std([r['knn_top1_k200'] for r in results])} | "
                     f"{mean_std([r['linear_top1'] for r in results])} | | | | | |")
    if pixels:
        lines.append(f"| raw pixels | - | {pixels['knn_top1_k20']:.2f} | "
                     f"{pixels['knn_top1_k200']:.2f} | {pixels['linear_top1']:.2f} | | | | | |")
    return lines, csv


def distill_table(args):
    rows = distill_rows(args)
    lines = ["| model | test top-1 | vs the student alone | train (min) | img/s |",
             "|---|---|---|---|---|"]
    csv, alone = [], {}  # student -> its top-1 per seed, trained alone (the rows come after it)
    for key in rows:
        runs = [os.path.join(args.out_root, "teacher")] if key == "teacher" else \
            [os.path.join(args.out_root, key, f"seed{s}") for s in args.seeds]
        top1 = [r[-1]["test_top1"] for r in map(log_rows, runs) if r and "test_top1" in r[-1]]
        cfg = recipe("ifacd_distill/" + DISTILL_ROWS[key][1])
        if key != "teacher" and cfg["distill"] == "none":
            alone[cfg["student"]] = top1
        base = alone.get(cfg["student"]) if cfg["distill"] != "none" else None
        delta = [a - b for a, b in zip(top1, base)] if base else []
        minutes = [(read_json(os.path.join(r, "time.json")) or {}).get("train_s", 0) / 60
                   for r in runs]
        ips = throughput(log_rows(runs[0]))[0]
        lines.append(f"| {DISTILL_ROWS[key][0]} | {mean_std(top1)} | "
                     f"{mean_std(delta, '{:+.2f}')} | {mean_std(minutes, '{:.1f}')} | "
                     f"{f'{ips:.0f}' if ips else '-'} |")
        csv += [[key, s, t, "", ""] for s, t in zip([0] if key == "teacher" else args.seeds, top1)]
    return lines, csv


def wall_times(args):
    """[(run, train s, eval s)] of every directory with a time.json under out_root, and the
    total."""
    found = []
    for dirpath, _, files in sorted(os.walk(args.out_root)):
        if "time.json" in files:
            t = read_json(os.path.join(dirpath, "time.json"))
            found.append((os.path.relpath(dirpath, args.out_root), t.get("train_s", 0),
                          t.get("eval_s", 0)))
    return found, sum(a + b for _, a, b in found)


def curves(args):
    """The training-time k-NN monitor of every SSL row (seed of the first run) against images seen:
    curves.json, and curves.png (eval/plot.py: the loss and the k-NN panels) when matplotlib is
    there."""
    data, runs = {}, {}
    for key in (k for k in SSL_ROWS if k in args.rows):
        run = os.path.join(args.out_root, key, f"seed{args.seeds[0]}")
        batch = recipe(SSL_ROWS[key][2])["batch_size"]
        # rows differ in steps per epoch
        rows = [dict(r, kimg=r["step"] * batch / 1000) for r in log_rows(run)]
        points = [(r["kimg"], r["knn_top1"]) for r in rows if "knn_top1" in r]
        if points:
            data[SSL_ROWS[key][0]], runs[SSL_ROWS[key][0]] = points, rows
    if not data:
        return
    with open(os.path.join(args.out_root, "curves.json"), "w") as f:
        json.dump(data, f, indent=1)
    sys.path.insert(0, ROOT)
    from common.config import ConfigError
    from eval.plot import plot_curves
    try:
        plot_curves(runs, os.path.join(args.out_root, "curves.png"), x="kimg",
                    xlabel="training images seen (thousands)",
                    knn_label="20-NN top-1 (%), 10k-image bank", title="Fashion-MNIST, CPU recipes")
    except ConfigError as e:
        print(f"no curves.png: {e}")


def report(args, distill):
    if distill:
        lines, csv = distill_table(args)
        intro = ("Distillation (ifacd_distill.py): test top-1 of the last epoch; the teacher is "
                 "trained once (seed 0).")
    else:
        lines, csv = ssl_table(args)
        intro = ("Self-supervised rows: the final online/student backbone on frozen features "
                 "(k-NN: the 60k training images as neighbours, T 0.07; linear: a probe on "
                 "standardised features). '20-NN vs raw pixels' > 0: the row beats k-NN on raw "
                 "pixels.")
    times, total = wall_times(args)
    text = [f"# Fashion-MNIST (60k train / 10k test, 28 px), seeds {args.seeds}", "",
            f"Machine: {machine()}. Total wall time of the runs below: {total / 60:.1f} min.", "",
            intro, "", *lines, "", "Wall time per run (train / eval, minutes):", "",
            *[f"- {name}: {a / 60:.1f} / {b / 60:.1f}" for name, a, b in times]]
    os.makedirs(args.out_root, exist_ok=True)
    with open(os.path.join(args.out_root, "results.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(args.out_root, "results.csv"), "w") as f:
        f.write("row,seed,knn_top1_k20_or_test_top1,knn_top1_k200,linear_top1\n")
        f.writelines(",".join(map(str, r)) + "\n" for r in csv)
    if not distill:
        curves(args)
    print("\n".join(text))


def main(argv, table="fashion_mnist"):
    args, extra = parse_args(argv, table)
    run_all(args, extra)
    if not args.dry_run:
        report(args, distill=table == "fashion_mnist_distill")
