"""The claims table: each paper's headline comparison, its arms under one protocol,
several seeds, a verdict.

    python scripts/run_table.py claims                    # every claim, seeds 0 1 2 (resumable)
    python scripts/run_table.py claims --claims 1 7 --seeds 0 1 2 3 4
    python scripts/run_table.py claims --dry_run          # print the commands
    python scripts/run_table.py claims --report_only      # rebuild docs/claims.md from the records

Every claim runs on Fashion-MNIST (offline: Debian's dataset-fashion-mnist, the default --data_dir),
with its protocol in configs/claims/c<N>_*.yaml: the header says what is shared, why this scale
gives the effect its chance, and was written before any verdict was seen. The arms of a claim share
that YAML and differ only in the flags CLAIMS lists. A finished run (training, then its evaluations)
leaves a small JSON record under docs/claims/runs/: its numbers, per-epoch curves, command, wall
time, machine and git commit. The table is built from those records only, so it can be completed
over several sittings, and nothing in it is typed by hand.

Verdict of a comparison, from the paired differences over seeds (arm A minus arm B on the same seed,
or metric A minus metric B within one run): their mean and 95% t-interval. reproduced = the interval
excludes 0 in the paper's direction; reversed = it excludes 0 the other way; not shown = it
contains 0. For a claim of closeness ("~m"): reproduced = the interval lies inside [-m, m],
reversed = it lies outside, not shown otherwise.
"""
import argparse
import csv
import glob
import math
import os
import re
import statistics
import subprocess
import sys

from runs import ROOT, command, is_complete, log_rows, machine, read_json, timed

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# t(0.975, df = 1..10)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
# k-NN (the 60k training images as neighbours) and a linear probe, one pass
FROZEN = ["-m", "eval.frozen"]
# a per-block metric's name: [prefix_]b<block>_<metric> (eval.frozen --layer all)
BLOCK_KEY = re.compile(r"(?:^|_)b(\d+)_")


def blocks(prefix, metric, depth=6):
    return [f"{prefix}b{b}_{metric}" for b in range(1, depth + 1)]


def sdssl_comparisons():
    """SDSSL Fig. 3 per block, on the teacher (what the paper evaluates) and the student; then 'most
    at the middle' (block 3 of 6, as the paper's block 6 of 12) against the last block."""
    rows = []
    for which in ("teacher", "student"):
        for metric in ("linear", "knn20"):
            rows += [(f"{which} block {b + 1} {metric}: SD - plain", m, "sd", "plain", ">",
                      "+34.3 at block 6 of 12, +1.2 at the last (linear, teacher)" if b in (2, 5)
                      else "> 0")
                     for b, m in enumerate(blocks(which + "_", metric))]
        rows.append((f"{which} linear: (SD - plain) at block 3 minus at block 6",
                     f"{which}_b3_linear - {which}_b6_linear", "sd", "plain", ">",
                     "+33.1 (34.3 - 1.2)"))
    return rows


# Each claim: where it is, the config and script its arms share, the arms' flags, eval.frozen passes
# per run (name prefix -> flags), baseline arms made by evaluation alone, and the comparisons:
# (label, metric or "metric - metric", arm A, arm B or None (within A), ">" or "~margin", the
# paper's number).
CLAIM_1 = dict(
    paper="SimSiam (Chen & He, CVPR 2021)", where="Sec. 4.1, Fig. 2",
    statement="without the stop-gradient the output collapses: the per-channel std of the "
              "l2-normalised output goes to 0 and k-NN accuracy falls to chance",
    script="simsiam_gsg.py", config="claims/c1_simsiam_stop_grad.yaml",
    arms={"stop_grad": [], "no_stop_grad": ["--stop_grad", "false"]},
    evals={"": []}, log=["out_std", "knn_top1", "loss"],
    baselines={"random_init": ["--arch", "resnet8"]},
    comparisons=[
        ("out_std (last epoch): stop-grad - none", "out_std", "stop_grad", "no_stop_grad", ">",
         "~0.02 (= 1/sqrt(2048)) vs 0"),
        ("20-NN: stop-grad - none", "knn20", "stop_grad", "no_stop_grad", ">",
         "linear 67.7 vs 0.1"),
        ("20-NN: random init - no stop-grad", "knn20", "random_init", "no_stop_grad", ">",
         "k-NN at chance (0.1 of 1000 classes)")])

CLAIMS = {
    "1": CLAIM_1,
    # claim 1 again, longer: a change made after claim 1's verdict (its config says why)
    "1b": dict(CLAIM_1, config="claims/c1b_simsiam_stop_grad_600_steps.yaml",
               statement="as claim 1, with 600 steps instead of 200 (a protocol changed after "
                         "seeing claim 1's verdict: every arm rerun)"),
    # and again with the lr held at its peak: a second change, declared before its runs
    "1c": dict(CLAIM_1, config="claims/c1c_simsiam_stop_grad_constant_lr.yaml",
               statement="as claim 1b, with the lr held at its peak (Fig. 2's window of a long "
                         "cosine) instead of a cosine to 0 in 600 steps (a second protocol "
                         "change, declared before its runs: every arm rerun)"),
    "2": dict(
        paper="SimCLR (Chen et al., ICML 2020)", where="Sec. 4.2, Fig. 8",
        statement="the representation h before the projection head is better than the head's "
                  "output g(h)",
        script="simclr.py", config="claims/c2_simclr_head.yaml",
        arms={"simclr": []}, evals={"": [], "head_": ["--head", "true"]},
        log=["out_std", "knn_top1", "loss"],
        comparisons=[("linear: h - g(h)", "linear - head_linear", "simclr", None, ">",
                      "> +10 (ImageNet)"),
                     ("20-NN: h - g(h)", "knn20 - head_knn20", "simclr", None, ">", "-")]),
    "3": dict(
        paper="SDSSL (Jang et al., 2021)", where="Fig. 3",
        statement="SD-MoCo v3 beats MoCo v3 at every block, most at the middle blocks, the last "
                  "block no worse",
        script="sdssl.py", config="claims/c3_sdssl_mocov3.yaml",
        arms={"plain": ["--alpha_max", "0", "--pred_loss", "false"], "sd": []},
        evals={"teacher_": ["--layer", "all", "--which", "teacher"],
               "student_": ["--layer", "all", "--which", "model"]},
        log=["out_std", "knn_top1", "loss"], comparisons=sdssl_comparisons()),
    "4": dict(
        paper="GSG (Lee & Lee, NeurIPS 2023)", where="Tables 1-2",
        statement="SimSiam + GSG beats SimSiam and BYOL + GSG beats BYOL at the same number of "
                  "epochs",
        script="simsiam_gsg.py", config="claims/c4_gsg.yaml",
        arms={"simsiam": ["--base", "simsiam", "--gsg", "false"],
              "simsiam_gsg": ["--base", "simsiam"],
              "byol": ["--base", "byol", "--gsg", "false"], "byol_gsg": ["--base", "byol"]},
        evals={"": []}, log=["out_std", "knn_top1", "loss"],
        comparisons=[(f"{m}: {a} - {b}", key, a, b, ">", "> 0 (the paper's tables)")
                     for a, b in (("simsiam_gsg", "simsiam"), ("byol_gsg", "byol"))
                     for m, key in (("20-NN", "knn20"), ("linear", "linear"))]),
    "5": dict(
        paper="MSBReg (Moon et al., WACV 2023)", where="Tables 8 and 11",
        statement="K = 4 views beat K = 2 (= BYOL) at the same epochs; L_s and L_b each add to L_c",
        script="msbreg.py", config="claims/c5_msbreg.yaml",
        arms={"k2_byol": ["--num_views", "2", "--centroid", "none", "--lambda_s", "0",
                          "--lambda_b", "0"],
              "k4": [], "k4_no_ls": ["--lambda_s", "0"], "k4_no_lb": ["--lambda_b", "0"]},
        evals={"": []}, log=["out_std", "knn_top1", "loss"],
        comparisons=[(f"{m}: {a} - {b}", key, a, b, ">", paper)
                     for a, b, paper in (("k4", "k2_byol", "+8.46 (80.38 vs 71.92)"),
                                         ("k4", "k4_no_ls", "+0.64 (80.38 vs 79.74)"),
                                         ("k4", "k4_no_lb", "+0.70 (80.38 vs 79.68)"))
                     for m, key in (("linear", "linear"), ("20-NN", "knn20"))]),
    "6": dict(
        paper="IFACD (Rios et al., slides)", where="accuracy and ablation tables",
        statement="every distiller beats the student trained alone; IFACD with 2 teacher layers >= "
                  "1 layer; IFACD close to CRD",
        script="ifacd_distill.py", config="claims/c6_distill_student.yaml",
        setup={"teacher": ("claims/c6_distill_teacher.yaml", [])},
        arms={"student": ["--distill", "none"], "kd": ["--distill", "kd"],
              "crd": ["--distill", "crd"],
              "ifacd1": ["--distill", "ifacd", "--ifacd_layers", "1"],
              "ifacd2": ["--distill", "ifacd", "--ifacd_layers", "2"]},
        evals={}, log=["test_top1", "loss"],
        comparisons=[(f"test top-1: {a} - student", "test_top1", a, "student", ">", paper)
                     for a, paper in (("kd", "+2.53 (r56 -> r20), +2.74 avg"),
                                      ("crd", "+2.45, +3.05 avg"), ("ifacd1", "+2.53, +2.87 avg"),
                                      ("ifacd2", "+2.70, +3.01 avg"))]
        + [("test top-1: ifacd2 - ifacd1", "test_top1", "ifacd2", "ifacd1", ">",
            "+0.17 (r56 -> r20), +0.14 avg"),
           ("test top-1: ifacd2 - crd (close: within 1 point)", "test_top1", "ifacd2", "crd", "~1",
            "+0.25 (r56 -> r20), -0.04 avg")]),
    "7": dict(
        paper="IFACLR (IFACD slides, appendix A)", where="appendix A, 'obstacles'",
        statement="the 'identity function' obstacle: the layers' projections become the same "
                  "vector (layer 1 as similar as layer N)",
        script="ifaclr.py", config="claims/c7_ifaclr.yaml",
        arms={"ifaclr": []}, evals={"": ["--layer", "all"]},
        log=["layer_cos", "out_std", "knn_top1", "loss"],
        comparisons=[("layer_cos: last epoch - first epoch", "layer_cos - first_layer_cos",
                      "ifaclr", None, ">", "-> 1 (no number)"),
                     ("20-NN: block 6 - block 5 (the same: within 1 point)", "b6_knn20 - b5_knn20",
                      "ifaclr", None, "~1", "equal (no number)")]),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run_table.py claims", description=__doc__.splitlines()[0])
    p.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS),
                   help="claims to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data_dir",
                   default=FASHION_MNIST if os.path.isdir(FASHION_MNIST) else "./data",
                   help="Fashion-MNIST's idx files (default: Debian's package if installed, else "
                        "./data)")
    p.add_argument("--linear_epochs", type=int, default=30,
                   help="epochs of the linear probe on frozen features")
    p.add_argument("--out_root", default=os.path.join("out", "claims"),
                   help="run directories (checkpoints)")
    p.add_argument("--records", default=os.path.join("docs", "claims", "runs"),
                   help="one JSON per finished run")
    p.add_argument("--report", default=os.path.join("docs", "claims.md"),
                   help="the table (also .csv beside it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each with cores / jobs threads (tiny CPU nets use a "
                        "second thread poorly: 2 jobs of 1 thread on 2 cores)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the commands instead of running them")
    p.add_argument("--report_only", action="store_true",
                   help="only rebuild the report from the records")
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


# -------------------------------------------- running ---------------------------------------------

def config_path(name):
    return os.path.join(ROOT, "configs", name)


def record_path(args, claim, arm, seed):
    return os.path.join(args.records, f"c{claim}", f"{arm}_seed{seed}.json")


def frozen_metrics(result, prefix):
    """eval.frozen's JSON -> {prefix + knn20 / knn200 / linear}, per block as prefix + b<l>_... for
    --layer all."""
    def short(r, p):
        return {p + "knn20": r["knn_top1_k20"], p + "knn200": r["knn_top1_k200"],
                p + "linear": r["linear_top1"]}
    if "layers" not in result:
        return short(result, prefix)
    out = {}
    for layer, row in zip(result["layers"], result["rows"]):
        out.update(short(row, f"{prefix}b{layer}_"))
    return out


def log_metrics(run_dir, keys):
    """The last epoch's value of each key in log.jsonl, the first epoch's as first_<key>, and every
    epoch's as a curve (with the images seen, for the figures)."""
    rows = log_rows(run_dir)
    metrics, curves = {}, {"epoch": [r["epoch"] for r in rows]}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            metrics[key], metrics["first_" + key], curves[key] = values[-1], values[0], values
    return metrics, curves


def git_commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+uncommitted" if dirty else "")


def run_one(args, extra, claim, arm, seed, spec, teacher=None, launch=timed):
    """Train (unless finished), evaluate, and write the run's record. Returns nothing; everything is
    on disk. `launch`: runs.timed (scripts/claims_budget.py passes its own, to collect the
    commands).
    With --jobs > 1 each process gets cores / jobs threads and writes its output to
    run_dir/stdout.log."""
    out = os.path.join(args.out_root, f"c{claim}", arm, f"seed{seed}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    log_path = os.path.join(out, "stdout.log") if args.jobs > 1 and not args.dry_run else ""
    if log_path:
        os.makedirs(out, exist_ok=True)
    record = record_path(args, claim, arm, seed)
    if os.path.exists(record):
        print(f"# done: claim {claim} {arm} seed {seed} ({record})")
        return
    data = ["--data_dir", args.data_dir, "--download", "false"]
    cmd = None
    if arm in spec["arms"]:
        flags = spec["arms"][arm]
        cmd = command(config_path(spec["config"]), out, 0, data + flags + extra, seed, teacher,
                      script=spec["script"])
        if not is_complete(out):
            launch(cmd, out, "train_s", args.dry_run, threads, log_path)
        evals = {prefix: ["--checkpoint", os.path.join(out, "last.pt")] + flags
                 for prefix, flags in spec["evals"].items()}
    else:  # a baseline: the same architecture at random init, evaluated with the run's seed
        evals = {"": ["--dataset", "fashion_mnist", "--seed", str(seed)] + spec["baselines"][arm]}
    metrics = {}
    for prefix, flags in evals.items():
        path = os.path.join(out, f"eval_{prefix or 'backbone'}.json".replace("_.", "."))
        if not os.path.exists(path):
            os.makedirs(out, exist_ok=True) if not args.dry_run else None
            launch([sys.executable, *FROZEN, *flags, "--data_dir", args.data_dir, "--json", path,
                    "--linear_epochs", str(args.linear_epochs)], out, "eval_s", args.dry_run,
                   threads, log_path)
        if not args.dry_run:
            metrics.update(frozen_metrics(read_json(path), prefix))
    if args.dry_run:
        return
    logged, curves = log_metrics(out, spec["log"]) if arm in spec["arms"] else ({}, {})
    times = read_json(os.path.join(out, "time.json")) or {}
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
        import json
        json.dump({"claim": claim, "arm": arm, "seed": seed, "metrics": {**metrics, **logged},
                   "curves": curves, "train_s": times.get("train_s", 0.0),
                   "eval_s": times.get("eval_s", 0.0), "jobs": args.jobs,
                   "threads": threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
                   "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                                       for c in cmd)
                   if cmd else "eval.frozen only", "git": git_commit(), "machine": machine()},
                  f, indent=1)


def run_all(args, extra, launch=timed):
    """The setup runs first (a claim's teacher, trained once with seed 0, all cores), then every
    (claim, seed, arm), --jobs of them at a time; each command through `launch` (run_one)."""
    tasks = []
    for claim in args.claims:
        spec = CLAIMS[claim]
        teacher = None
        for name, (cfg, flags) in spec.get("setup", {}).items():
            teacher = os.path.join(args.out_root, f"c{claim}", name)
            if not is_complete(teacher):
                launch(command(config_path(cfg), teacher, 0,
                               ["--data_dir", args.data_dir, "--download", "false"] + flags + extra,
                               0), teacher, "train_s", args.dry_run)
        tasks += [(claim, arm, seed, spec, teacher) for seed in args.seeds
                  for arm in list(spec["arms"]) + list(spec.get("baselines", {}))]
    if args.jobs <= 1 or args.dry_run:
        for task in tasks:
            run_one(args, extra, *task, launch=launch)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_one, args, extra, *task, launch=launch) for task in tasks]:
            future.result()  # re-raises a failed run's error


# -------------------------------------------- verdicts --------------------------------------------

def value(metrics, expression):
    """A metric, or 'a - b' of two metrics of the same run."""
    names = [n.strip() for n in expression.split(" - ")]
    if any(n not in metrics for n in names):
        return None
    return metrics[names[0]] - (metrics[names[1]] if len(names) > 1 else 0.0)


def interval(diffs):
    """(mean, half-width of the 95% t-interval) of paired differences; half-width None with fewer
    than 2."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, (T95[min(len(diffs) - 1, len(T95)) - 1] * statistics.stdev(diffs)
                  / math.sqrt(len(diffs)))


def verdict(mean, half, kind):
    """reproduced / not shown / reversed (see the module docstring); 'too few seeds' without an
    interval."""
    if half is None:
        return "too few seeds"
    low, high = mean - half, mean + half
    if kind.startswith("~"):
        margin = float(kind[1:])
        return "reproduced" if -margin <= low and high <= margin else \
            "reversed" if high < -margin or low > margin else "not shown"
    return "reproduced" if low > 0 else "reversed" if high < 0 else "not shown"


def compare(records, comparison):
    """One comparison over the seeds both sides have: (differences per seed, mean, half-width,
    verdict)."""
    label, metric, a, b, kind, paper = comparison
    diffs = []
    for seed, rec in sorted(records.get(a, {}).items()):
        va = value(rec["metrics"], metric)
        vb = 0.0 if b is None else (value(records[b][seed]["metrics"], metric)
                                    if seed in records.get(b, {}) else None)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    if not diffs:
        return [], None, None, "not run"
    mean, half = interval(diffs)
    return diffs, mean, half, verdict(mean, half, kind)


# ------------------------------------------- the report -------------------------------------------

def load_records(args, claim):
    """{arm: {seed: record}} of every seed recorded (not only --seeds: the report shows every
    run)."""
    out = {}
    for arm in list(CLAIMS[claim]["arms"]) + list(CLAIMS[claim].get("baselines", {})):
        for path in glob.glob(record_path(args, claim, arm, "*")):
            seed = re.fullmatch(r"seed(\d+)\.json", path.rsplit("_", 1)[-1])
            rec = read_json(path) if seed else None
            if rec:
                out.setdefault(arm, {})[int(seed.group(1))] = rec
    return {arm: dict(sorted(recs.items())) for arm, recs in out.items()}


def fmt(x, digits=2):
    return "-" if x is None else f"{x:+.{digits}f}"


def header_lines(spec):
    """The first comment block of the claim's config: its protocol, written before the runs."""
    lines = []
    with open(config_path(spec["config"])) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return " ".join(lines)


def arm_lines(spec, records):
    """Per arm: mean +- std over seeds of the headline metrics that are not per block, every seed's
    value, and the wall time."""
    keys = sorted({k for c in spec["comparisons"] for k in c[1].split(" - ")}
                  | ({"out_std"} if "out_std" in spec["log"] else set()))
    keys = [k.strip() for k in keys if not BLOCK_KEY.search(k.strip())  # block_lines
            and any(k.strip() in r["metrics"] for recs in records.values() for r in recs.values())]
    lines = ["| arm | flags | " + " | ".join(keys) + " | train + eval (min per run) |",
             "|---" * (len(keys) + 3) + "|"]
    for arm, recs in records.items():
        cells = []
        for k in keys:
            vals = [r["metrics"][k] for r in recs.values() if k in r["metrics"]]
            each = ", ".join(f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}" for v in vals)
            cells.append(f"{statistics.mean(vals):.4g} ± "
                         f"{statistics.stdev(vals) if len(vals) > 1 else 0:.2g} "
                         f"({each})" if vals else "-")
        minutes = statistics.mean((r["train_s"] + r["eval_s"]) / 60 for r in recs.values())
        flags = " ".join(spec["arms"].get(
            arm, ["(eval only) " + " ".join(spec.get("baselines", {}).get(arm, []))]))
        lines.append(f"| {arm} | `{flags or '(the config)'}` | " + " | ".join(cells)
                     + f" | {minutes:.1f} |")
    return lines


def block_lines(records):
    """Per-block metrics (prefix + b<l>_ + metric) as one row per arm and prefix, a column per
    block: mean +- std over seeds."""
    names = sorted({k for recs in records.values() for r in recs.values() for k in r["metrics"]})
    series = sorted({re.sub(r"b\d+_", "b*_", k) for k in names if BLOCK_KEY.search(k)})
    if not series:
        return []
    depth = max(int(m) for k in names for m in BLOCK_KEY.findall(k))
    lines = ["Per block (mean ± std over seeds):", "",
             "| arm | metric | " + " | ".join(f"block {b}" for b in range(1, depth + 1)) + " |",
             "|---" * (depth + 2) + "|"]
    for arm, recs in records.items():
        for s in series:
            cells = []
            for b in range(1, depth + 1):
                vals = [r["metrics"][s.replace("b*_", f"b{b}_")] for r in recs.values()
                        if s.replace("b*_", f"b{b}_") in r["metrics"]]
                cells.append(f"{statistics.mean(vals):.2f} ± "
                             f"{statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"
                             if vals else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {arm} | {s.replace('b*_', '')} | " + " | ".join(cells) + " |")
    return lines + [""]


def claim_lines(args, claim):
    spec, records = CLAIMS[claim], load_records(args, claim)
    lines = [f"### Claim {claim}: {spec['paper']}, {spec['where']}", "",
             f"**Claim.** {spec['statement']}.", "",
             f"**Protocol** (`configs/{spec['config']}`, `{spec['script']}`): "
             f"{header_lines(spec)}", ""]
    if not records:
        return lines + ["Not run yet.", ""]
    for png in sorted(glob.glob(os.path.join(os.path.dirname(args.records), f"c{claim}_*.png"))):
        link = os.path.relpath(png, os.path.dirname(args.report) or ".")
        lines += [f"![claim {claim}]({link})", ""]
    lines += arm_lines(spec, records) + [""] + block_lines(records) + [
        "| comparison | n | difference per seed | "
        "mean [95% CI] | paper | verdict |", "|---|---|---|---|---|---|"]
    for comparison in spec["comparisons"]:
        diffs, mean, half, result = compare(records, comparison)
        d = 4 if diffs and max(map(abs, diffs)) < 0.1 else 2  # out_std differs in its 3rd decimal
        ci = ("-" if mean is None else f"{fmt(mean, d)} [{fmt(mean - half, d)}, "
              f"{fmt(mean + half, d)}]" if half else fmt(mean, d))
        lines.append(f"| {comparison[0]} | {len(diffs)} | {', '.join(fmt(x, d) for x in diffs)} | "
                     f"{ci} | {comparison[5]} | **{result}** |")
    return lines + [""]


def csv_rows(args):
    rows = [["claim", "arm", "seed", "metric", "value", "train_s", "eval_s", "git"]]
    for claim in CLAIMS:
        for arm, recs in load_records(args, claim).items():
            for seed, rec in recs.items():
                rows += [[claim, arm, seed, k, v, rec["train_s"], rec["eval_s"], rec["git"]]
                         for k, v in sorted(rec["metrics"].items())]
    return rows


def summary_lines(args):
    """One row per claim: how many of its comparisons came out each way, and the runs behind
    them."""
    lines = ["| claim | paper | comparisons: reproduced / not shown / reversed | runs (seeds) | "
             "minutes (train + eval, all runs) |", "|---|---|---|---|---|"]
    total = 0.0
    for claim, spec in CLAIMS.items():
        records = load_records(args, claim)
        verdicts = [compare(records, c)[3] for c in spec["comparisons"]]
        counts = " / ".join(str(verdicts.count(v)) for v in ("reproduced", "not shown", "reversed"))
        pending = len(verdicts) - sum(verdicts.count(v)
                                      for v in ("reproduced", "not shown", "reversed"))
        counts += f" ({pending} of {len(verdicts)} without 2 seeds yet)" if pending else ""
        seeds = sorted({s for recs in records.values() for s in recs})
        runs = sum(len(recs) for recs in records.values())
        minutes = sum(r["train_s"] + r["eval_s"] for recs in records.values()
                      for r in recs.values()) / 60
        total += minutes
        lines.append(f"| [{claim}](#claim-{claim}-{anchor(spec)}) | {spec['paper']}, "
                     f"{spec['where']} | {counts if runs else 'not run yet'} | {runs} "
                     f"({', '.join(map(str, seeds)) or '-'}) | {minutes:.0f} |")
    return lines + [f"| all | | | | {total:.0f} |"]


def anchor(spec):
    """The GitHub anchor of a claim's heading after 'claim-N-'."""
    return re.sub(r"[^a-z0-9 -]", "", f"{spec['paper']}, {spec['where']}".lower()).replace(" ", "-")


def replace_block(text, name, lines):
    """The report keeps hand-written text outside each generated block (between its markers)."""
    begin, end = (f"<!-- {name}: generated by run_table.py claims -->", f"<!-- end of {name} -->")
    block = "\n".join([begin] + lines + [end])
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"


def report(args):
    """docs/claims.md (each claim's generated block replaced, the rest kept), docs/claims.csv, the
    figures, and the summary in README.md's Results (for the repository's own docs/claims.md). The
    figures come first: each claim's block links the ones that exist."""
    figures(args)
    text = open(args.report).read() if os.path.exists(args.report) else "# Claims\n"
    summary = summary_lines(args)
    text = replace_block(text, "summary", summary)
    for claim in CLAIMS:
        text = replace_block(text, f"claim {claim}", claim_lines(args, claim))
    os.makedirs(os.path.dirname(args.report) or ".", exist_ok=True)
    with open(args.report, "w") as f:
        f.write(text)
    readme = os.path.join(ROOT, "README.md")  # its Results open with the same summary
    if os.path.abspath(args.report) == os.path.join(ROOT, "docs", "claims.md"):
        summary = [line.replace("](#claim-", "](docs/claims.md#claim-") for line in summary]
        text = open(readme).read()
        if "<!-- summary: generated" in text:
            with open(readme, "w") as f:
                f.write(replace_block(text, "summary", summary))
    with open(os.path.splitext(args.report)[0] + ".csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(args))
    print(f"wrote {args.report}")


def figures(args):
    """docs/claims/c1*_collapse.png, c3_blocks.png, c7_layers.png from the records
    (needs matplotlib)."""
    try:
        from claims_plots import plot_all
    except ImportError as e:
        print(f"no figures ({e})")
        return
    plot_all({c: load_records(args, c) for c in CLAIMS}, os.path.dirname(args.records))


def main(argv, table="claims"):
    args, extra = parse_args(argv)
    if not args.report_only:
        run_all(args, extra)
    if not args.dry_run:
        report(args)
