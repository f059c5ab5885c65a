"""Copying one method into coursework, as the README's "Copying one method" section says: its copy
commands, run as written into an empty directory, give a script that trains on fake data there; and
every loss the section calls stand-alone uses only torch (and common.dist where it says so)."""
import builtins
import importlib
import os
import re
import subprocess
import sys
import types

import pytest

from helpers import ROOT

README = os.path.join(ROOT, "README.md")


def readme_section():
    text = open(README).read()
    begin, end = "<!-- copy:begin -->", "<!-- copy:end -->"
    assert begin in text and end in text, "the README's copy section lost its markers"
    return text[text.index(begin):text.index(end)]


@pytest.mark.e2e
def test_the_readme_copy_commands_give_a_script_that_runs_alone(tmp_path):
    block = re.search(r"```bash\n(.*?)```", readme_section(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the repository
    env["OMP_NUM_THREADS"] = "1"
    copy_dir = tmp_path / "my_copy"
    commands = " && ".join(lines).replace("my_copy", str(copy_dir))
    subprocess.run(["bash", "-c", commands.split(" && cd ")[0]], cwd=ROOT, check=True, env=env)
    assert sorted(os.listdir(copy_dir)) == ["common", "eval", "simclr.py"]
    run = "cd " + commands.split(" && cd ", 1)[1]
    out = subprocess.run(["bash", "-c", run.replace("python ", f"{sys.executable} ", 1)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.exists(copy_dir / "out" / "simclr" / "last.pt")


def global_names(code):
    """Every global name a function's code (nested functions and lambdas included) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


def standalone_table():
    """{module: [(function, needs common.dist)]} from the section's table rows."""
    table = {}
    for module, functions, with_dist in re.findall(r"^\| `(\w+)\.py` \|(.*?)\|(.*?)\|$",
                                                   readme_section(), re.M):
        for cell, needs_dist in ((functions, False), (with_dist, True)):
            table.setdefault(module, []).extend((f, needs_dist) for f in re.findall(r"`(\w+)`", cell))
    return table


def test_the_standalone_losses_need_only_torch_and_common_dist():
    table = standalone_table()
    assert {"simclr", "mocov3", "byol", "simsiam_gsg", "sdssl", "msbreg", "ifaclr", "ifacd_distill",
            "distill_losses"} <= set(table)
    for module_name, functions in table.items():
        module = importlib.import_module(module_name)
        listed = {name for name, _ in functions}
        for name, needs_dist in functions:
            fn = getattr(module, name)
            used = {n for n in global_names(fn.__code__) if n in fn.__globals__ and not hasattr(builtins, n)}
            allowed = {"torch", "nn", "F", "math", "functools"} | listed | ({"dist"} if needs_dist else set())
            assert used <= allowed, f"{module_name}.{name} also needs {sorted(used - allowed)}"
            assert needs_dist == ("dist" in used), f"{module_name}.{name}: the README's dist column is wrong"


def test_global_names_sees_nested_functions():
    """The check above is not vacuous: a helper read inside a lambda or nested function is seen."""
    def loss(x):
        return helper_a(lambda y: helper_b(y))  # noqa: F821  (never called)
    assert {"helper_a", "helper_b"} <= global_names(loss.__code__)
