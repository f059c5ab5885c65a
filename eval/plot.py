"""Training curves from log.jsonl files:
the loss, the k-NN monitor's top-1 and the collapse monitor per epoch.

    python -m eval.plot out/run_a/log.jsonl out/run_b/log.jsonl -o curves.png
    python -m eval.plot out/run_a out/run_b -o curves.png    # a run directory stands for its
                                                             # log.jsonl

Panels side by side: `loss`, `knn_top1` (written every `eval_every` epochs; runs without it are left
out of that panel) and, when a log has them, `out_std` (common.log.output_std: 1/sqrt(D) healthy,
0 collapsed) and `out_top1` (common.log.output_spectrum: 1 when the outputs lie along one
direction), against `epoch` as log.jsonl numbers it (0 = the row written after the first epoch).
Each run is labelled by its directory's name, or by as many trailing path parts as it takes to tell
the runs apart (out/simclr/seed0 and out/byol/seed0 become simclr/seed0 and byol/seed0).

matplotlib is not a requirement of this repository: without it this says so in one line (exit status
2).
"""
import argparse
import json
import os

from common.config import ConfigError, run
from eval.layers import pyplot


def read_log(path):
    """The rows of one log.jsonl (a run directory means its log.jsonl), or a ConfigError that says
    what is wrong."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such log file (a training run writes output_dir/log.jsonl)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} line {n} is not JSON ({e.msg})") from None
    if not rows:
        raise ConfigError(f"{path} is empty: the run has not finished an epoch yet")
    return rows


def run_labels(paths):
    """The shortest trailing parts of each run's directory that tell all runs apart (the whole path
    at most)."""
    dirs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    parts = [d.strip(os.sep).split(os.sep) for d in dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels  # the same directory given twice: equal labels are all one can say


# the optional panels, each drawn when a log has its key: (key, y label, title)
MONITORS = [("out_std", "std of the L2-normalised output", "collapse monitor (out_std)"),
            ("out_top1", "variance share of the first direction",
             "one-direction collapse (out_top1)")]


def plot_curves(runs, path, x="epoch", xlabel="epoch", knn_label="k-NN top-1 (%)", title=""):
    """runs: {label: [log.jsonl rows]}. Writes a PNG with the loss, `knn_top1` and, if logged,
    `out_std` and `out_top1` against row[x]."""
    plt = pyplot()
    monitors = [m for m in MONITORS if any(m[0] in r for rows in runs.values() for r in rows)]
    fig, axes = plt.subplots(1, 2 + len(monitors), figsize=(5 * (2 + len(monitors)), 3.8))
    ax_loss, ax_knn = axes[:2]
    panels = [(ax_loss, "loss"), (ax_knn, "knn_top1")] + [
        (ax, key) for ax, (key, _, _) in zip(axes[2:], monitors)]
    for label, rows in runs.items():
        for ax, key in panels:
            points = [(r[x], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if not ax_knn.lines:  # every run had eval_every 0: say so instead of an empty frame
        ax_knn.text(0.5, 0.5, "no knn_top1 in these logs\n(eval_every 0)", ha="center", va="center",
                    transform=ax_knn.transAxes)
    ax_loss.set(xlabel=xlabel, ylabel="training loss", title="loss")
    ax_knn.set(xlabel=xlabel, ylabel=knn_label, title="k-NN monitor")
    for ax, (_, ylabel, panel_title) in zip(axes[2:], monitors):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=panel_title)
    for ax in axes:
        ax.grid(alpha=0.3)
        if x == "epoch":  # whole epochs only, no 0.5 ticks
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_loss.legend(fontsize=7, loc="upper right")  # a fixed place: "best" is slow with many runs
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files (or run directories holding one)")
    p.add_argument("-o", "--output", default="curves.png",
                   help="the PNG to write (default: curves.png)")
    p.add_argument("--title", default="", help="a title over both panels")
    args = p.parse_args(argv)
    # bad files fail first
    runs = {label: read_log(path) for label, path in zip(run_labels(args.logs), args.logs)}
    plot_curves(runs, args.output, title=args.title)
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(runs)})")


if __name__ == "__main__":
    run(main)
