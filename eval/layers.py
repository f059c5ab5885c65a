"""Per-layer results (multi-exit evaluation, SDSSL Fig. 3): a printed table and an optional PNG
curve.

matplotlib is not a requirement of this repository; it is imported only when a plot is asked for.
"""
import json
import os

from common.config import ConfigError
from common.log import is_main, print0


def report(title, layers, rows, plot_path=""):
    """rows[i] maps a metric name to its value for block layers[i]. Prints a table; writes
    PNG + JSON if asked."""
    names = list(rows[0])
    print0(f"{title}\n" + "block  " + "  ".join(f"{n:>10}" for n in names))
    for layer, row in zip(layers, rows):
        print0(f"{layer:>5}  " + "  ".join(f"{row[n]:>10.2f}" for n in names))
    if plot_path and is_main():
        plot(title, layers, rows, plot_path)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a clear error (it is not a requirement of this
    repository)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib (pip install matplotlib); the JSON files are "
                          "written already, or leave out the plot option") from None
    return plt


def plot(title, layers, rows, path):
    # first, so a missing matplotlib loses no result
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"title": title, "layers": layers, "rows": rows}, f, indent=1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in rows[0]:
        ax.plot(layers, [r[name] for r in rows], marker="o", label=name)
    ax.set(xlabel="block", ylabel="top-1 (%)", title=title, xticks=layers)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print0(f"wrote {path}")
