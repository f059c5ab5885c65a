"""Fixtures only (what tests share besides fixtures is in helpers.py): tiny generated data sets, a 1-process group in
the test process, the 2-rank gloo pool, one torch thread per module. Nothing here needs a GPU or the network.

Markers (pytest.ini): `e2e` tests start processes (a 2-rank launch, a script in its own process) and `sweep` tests
run one check over every method, pair or precision; both are part of the default run and left out of the inner loop
(`pytest -m "not e2e and not sweep"`). `slow` tests are kept out of the default run; every `slow` test is also `e2e`.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: `from helpers import ...` in every folder
from helpers import GlooPool, forkserver, write_cifar, write_image_folder  # noqa: E402  (helpers puts ROOT on sys.path)


def pytest_sessionstart(session):
    """Start the fork server that launches and the gloo pool fork from (helpers.forkserver) while pytest collects."""
    import multiprocessing.forkserver
    if forkserver().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A data_dir holding tiny cifar10 (40 train / 20 test) and cifar100 (40 / 20) files."""
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU forwards: one thread is several times faster than two on a shared 2-core machine
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in a test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def process_group():
    """A 1-process gloo group in the test process (losses call torch.distributed.get_rank())."""
    from common import dist
    return dist.setup("cpu")


@pytest.fixture(scope="session")
def gloo_pool():
    """Two worker processes in one 2-rank gloo group for the whole session (helpers.GlooPool), started on first use:
    `gloo_pool.run(fn, *args)` runs fn on both ranks and returns their results."""
    pool = GlooPool(2)
    yield pool
    pool.close()


@pytest.fixture
def feature_shapes_once(monkeypatch):
    """ifacd_distill.feature_shapes (a forward of the model) computed once per model and size in the test: tests
    that build many methods on one teacher and student."""
    import functools
    import ifacd_distill
    cached = functools.lru_cache(maxsize=None)(ifacd_distill.feature_shapes)
    monkeypatch.setattr(ifacd_distill, "feature_shapes", cached)


@pytest.fixture
def keep_group(monkeypatch):
    """The scripts' and eval tools' main() end with dist.cleanup(); keep the session's in-process group alive."""
    from common import dist
    monkeypatch.setattr(dist, "cleanup", lambda: None)
