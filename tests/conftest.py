"""Fixtures shared by the training, data and entry-point tests: tiny generated datasets and a finished demo run,
made once per session (per xdist worker), and private copies of them to damage. Plain helper functions and
constants are in tests/helpers.py."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.demo import generate
from tests.helpers import EntryPoints, demo_args, snapshot


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads: two workers of
    two threads each on two cores spend much of their time waiting for each other's threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    """pytest-xdist's work stealing (``make test``) hands each worker a contiguous share of this list, run from its
    front, and an idle worker steals from the back of another's: in collection order the long tests of the last
    files (test_train_*) came last and often ran alone at the end. The slow tests go first, dealt in turn to the
    workers' shares; the others follow in collection order, small enough to even out the end."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    slow = [item for item in items if item.get_closest_marker("slow")]
    if workers < 2 or not slow:
        return
    fast = [item for item in items if not item.get_closest_marker("slow")]
    order, left = [], len(items)
    for worker in range(workers):
        share = left // (workers - worker)  # xdist's split of what is left among the workers still without tests
        dealt = slow[worker::workers]
        order += dealt + fast[:max(0, share - len(dealt))]
        fast = fast[max(0, share - len(dealt)):]
        left -= share
    items[:] = order + fast


def seed_all() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same random state, whichever tests its pytest-xdist worker ran before (work
    stealing hands them out in a varying order): what a test draws without its own generator (model
    initialisation, ``torch.randn``) is then the same on every run and every machine."""
    seed_all()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """Fixtures made once per module or session (generated data, finished runs) start from the same state too:
    they are set up before the test's own seeding, by whichever test first asks for them."""
    if fixturedef.scope != "function":
        seed_all()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """10 classes, 4 train and 2 val images each, at 32x32, in both the folder and the zip layout."""
    return Path(generate(str(tmp_path_factory.mktemp("demo") / "data"), size=32, train_per_class=4,
                         val_per_class=2, log=None))


@pytest.fixture(scope="session")
def demo_data_224(tmp_path_factory) -> Path:
    """10 classes at 224x224, one val image each: the input of the official-layout 224 checkpoint fixture."""
    return Path(generate(str(tmp_path_factory.mktemp("demo224") / "data"), size=224, train_per_class=1,
                         val_per_class=1, zip_layout=False, log=None))


@pytest.fixture
def data(demo_data, tmp_path) -> Path:
    """A private copy of the demo dataset to damage."""
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


@pytest.fixture(scope="session")
def previous_run(demo_data, tmp_path_factory) -> Path:
    """The output root of a finished one-epoch demo run (in process): config, log and ckpt_epoch_0.pth."""
    from main import main
    output = tmp_path_factory.mktemp("previous")
    main(demo_args(demo_data, output))
    return output


@pytest.fixture
def copy_of(previous_run, tmp_path):
    """A private copy of the previous run's output root, and its snapshot."""
    output = tmp_path / "output"
    shutil.copytree(previous_run, output)
    return output, snapshot(output)


@pytest.fixture(scope="session")
def entry_points():
    """The entry points run as forked processes (tests/helpers.py ``EntryPoints``), started on first use."""
    server = EntryPoints()
    yield server
    server.close()
