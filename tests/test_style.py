"""What a reader scrolls through stays readable without wrapping: every line of the training scripts,
common/, eval/, scripts/ and the config headers is at most 100 characters (the tests may run to 120)."""
import glob
import os

from helpers import ROOT


def long_lines(pattern, limit):
    for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                length = len(line.rstrip("\n"))
                if length > limit:
                    yield f"{os.path.relpath(path, ROOT)}:{n} ({length} characters)"


def test_lines_fit_a_reader_s_screen():
    code = [p for pattern in ("*.py", "common/*.py", "eval/*.py", "scripts/*.py", "configs/**/*.yaml")
            for p in long_lines(pattern, 100)]
    tests = list(long_lines("tests/**/*.py", 120))
    assert not code + tests, "lines too long:\n" + "\n".join(code + tests)
