"""eval/plot.py: the loss and k-NN curves of several runs' log.jsonl in one PNG, and its clear errors."""
import json
import os
import sys

import pytest

from common.config import ConfigError
from helpers import run_python
from eval import plot


def write_log(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "log.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture
def two_logs(tmp_path):
    # run_a: k-NN every epoch; run_b: k-NN every second epoch (eval_every 2), so its right panel has fewer points
    a = write_log(str(tmp_path / "run_a"), [{"epoch": e, "step": 2 * (e + 1), "loss": 5.0 - e, "lr": 0.1,
                                            "img_per_s": 10.0, "knn_top1": 20.0 + 5 * e} for e in range(3)])
    b = write_log(str(tmp_path / "run_b"), [{"epoch": e, "step": 2 * (e + 1), "loss": -0.1 * e, "lr": 0.1,
                                            "img_per_s": 10.0, **({"knn_top1": 30.0} if e % 2 else {})}
                                           for e in range(3)])
    return a, b


def test_two_runs_make_one_png(two_logs, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # installed in this repository's venv; optional elsewhere
    out = str(tmp_path / "curves.png")
    plot.main([*two_logs, "-o", out, "--title", "tiny"])
    assert os.path.getsize(out) > 1000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "run_a, run_b" in capsys.readouterr().out  # labelled by their directories
    no_knn = write_log(str(tmp_path / "run_c"), [{"epoch": 0, "step": 1, "loss": 1.0}])  # eval_every 0
    plot.main([os.path.dirname(no_knn), "-o", str(tmp_path / "c.png")])  # a run directory stands for its log
    assert os.path.getsize(tmp_path / "c.png") > 1000


def png_width(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(24)[16:20], "big")  # the IHDR chunk's width


def test_collapse_monitors_get_a_panel_each_when_logged(two_logs, tmp_path):
    """out_std and out_top1 (the SSL scripts' collapse monitors) add one 5-inch panel each at 120 dpi."""
    pytest.importorskip("matplotlib")
    plot.main([*two_logs, "-o", str(tmp_path / "two.png")])
    monitored = write_log(str(tmp_path / "run_m"), [{"epoch": 0, "step": 1, "loss": 1.0, "out_std": 0.04,
                                                     "out_top1": 0.3, "out_rank": 100.0}])
    plot.main([two_logs[0], monitored, "-o", str(tmp_path / "four.png")])
    assert (png_width(tmp_path / "two.png"), png_width(tmp_path / "four.png")) == (1200, 2400)


def test_labels_use_as_much_of_the_path_as_it_takes(tmp_path):
    assert plot.run_labels(["out/a/log.jsonl", "out/b/log.jsonl"]) == ["a", "b"]
    assert plot.run_labels(["o/simclr/seed0/log.jsonl", "o/byol/seed0/log.jsonl"]) == ["simclr/seed0", "byol/seed0"]
    assert plot.run_labels([str(tmp_path)]) == [tmp_path.name]


def test_missing_matplotlib_is_a_clear_message(two_logs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match="plotting needs matplotlib .*pip install matplotlib"):
        plot.main([*two_logs, "-o", str(tmp_path / "x.png")])
    assert not os.path.exists(tmp_path / "x.png")


def test_missing_empty_or_broken_log_is_a_clear_error(two_logs, tmp_path):
    missing = str(tmp_path / "run_z" / "log.jsonl")
    with pytest.raises(ConfigError, match=r"run_z/log.jsonl: no such log file"):
        plot.main([two_logs[0], missing, "-o", str(tmp_path / "x.png")])
    with pytest.raises(ConfigError, match="is empty"):
        plot.main([write_log(str(tmp_path / "empty"), []), "-o", str(tmp_path / "x.png")])
    broken = write_log(str(tmp_path / "broken"), [{"epoch": 0, "loss": 1.0}])
    with open(broken, "a") as f:
        f.write('{"epoch": 1, "lo')  # a run killed while writing its row
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        plot.main([broken, "-o", str(tmp_path / "x.png")])
    assert not os.path.exists(tmp_path / "x.png")


@pytest.mark.e2e
def test_command_line_error_is_one_line(tmp_path):
    """`python -m eval.plot` with a missing file: exit status 2 and one line on stderr, no traceback."""
    out = run_python("-m", "eval.plot", tmp_path / "nope.jsonl")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: ") and "no such log file" in out.stderr
    assert "Traceback" not in out.stderr
