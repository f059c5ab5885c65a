"""The claims table's figures, drawn from the run records (scripts/claims.py): the collapse monitor
of claims 1, 1b and 1c, the per-block accuracy of claim 3, the layers of claim 7. Needs matplotlib
(not a requirement of the repository: claims.py skips the figures without it)."""
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def curves(ax, records, key, ylabel):
    """Every seed's per-epoch curve of `key`, one colour per arm."""
    for colour, (arm, recs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                   records.items()):
        for i, rec in enumerate(recs.values()):
            values = rec["curves"].get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, color=colour, alpha=0.8, marker="o",
                        markersize=3, label=arm if i == 0 else None)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def per_block(ax, records, prefix, metric, title):
    """Mean over seeds (error bar: std) of prefix + b<l>_ + metric per block, one line per arm."""
    for arm, recs in records.items():
        depth = len([k for k in next(iter(recs.values()))["metrics"] if k.startswith(prefix + "b")
                     and k.endswith("_" + metric)])
        xs = list(range(1, depth + 1))
        values = [[r["metrics"][f"{prefix}b{b}_{metric}"] for r in recs.values()] for b in xs]
        ax.errorbar(xs, [statistics.mean(v) for v in values],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], marker="o",
                    capsize=3, label=arm)
    ax.set(xlabel="block", ylabel=f"{metric} top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot_all(records, out_dir):
    """records: {claim: {arm: {seed: record}}}; writes the PNGs of the claims that have records."""
    os.makedirs(out_dir, exist_ok=True)
    for claim, steps in (("1", "200 steps"), ("1b", "600 steps"),
                         ("1c", "600 steps, constant lr")):
        if records.get(claim):
            runs = {a: r for a, r in records[claim].items() if a != "random_init"}
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
            curves(left, runs, "out_std", "out_std (std of the l2-normalised z)")
            curves(right, runs, "knn_top1", "20-NN top-1 (%), 10k-image bank")
            fig.suptitle(f"Claim {claim}: SimSiam with and without the stop-gradient, {steps} "
                         "(Fashion-MNIST)")
            save(fig, os.path.join(out_dir, f"c{claim}_collapse.png"))
    if records.get("3"):
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
        for ax, (prefix, metric) in zip(axes, [("teacher_", "linear"), ("teacher_", "knn20"),
                                               ("student_", "linear"), ("student_", "knn20")]):
            per_block(ax, records["3"], prefix, metric, f"{prefix.rstrip('_')}, {metric}")
        fig.suptitle("Claim 3: MoCo v3 (plain) vs SD-MoCo v3 per ViT block (Fashion-MNIST)")
        save(fig, os.path.join(out_dir, "c3_blocks.png"))
    if records.get("7"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        curves(left, records["7"], "layer_cos", "layer_cos (blocks 5 and 6)")
        per_block(right, records["7"], "", "knn20", "20-NN per block")
        fig.suptitle("Claim 7: IFACLR's layers (Fashion-MNIST)")
        save(fig, os.path.join(out_dir, "c7_layers.png"))
