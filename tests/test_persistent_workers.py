"""Training's data workers persist for the whole run, and an epoch's augmented batches are the same whether its
loader has run earlier epochs (an uninterrupted run) or starts at it (a resumed run)."""
from __future__ import annotations

import pytest
import torch

from data import build_train_loader
from engine import DistEnv
from tests.helpers import tiny_config
from utils import seed_everything

ENV = DistEnv(0, 1, 0, torch.device("cpu"))


def epoch_batches(loader, epoch):
    """The epoch as main.py enters it (utils.training_epochs): seeds, the sampler's epoch, then the batches, and
    a draw from the main process's generator after them (what drop-path and Mixup would draw)."""
    seed_everything(0, 0, epoch + 1)
    loader.sampler.set_epoch(epoch)
    return [images for images, _ in loader] + [torch.rand(4)]


@pytest.mark.slow
def test_workers_persist_and_an_epoch_is_the_same_after_a_resume(demo_data):
    # random crops and flips, so that every batch depends on the workers' random generators
    config = tiny_config("DATA.DATA_PATH", str(demo_data), "DATA.NUM_WORKERS", 2, "AUG.COLOR_JITTER", 0.4)
    _, uninterrupted = build_train_loader(config, ENV)
    assert uninterrupted.persistent_workers
    epoch_batches(uninterrupted, 0)
    workers = uninterrupted._iterator._workers
    continued = epoch_batches(uninterrupted, 1)
    assert uninterrupted._iterator._workers == workers  # the same processes served both epochs
    _, resumed = build_train_loader(config, ENV)
    for ours, theirs in zip(continued, epoch_batches(resumed, 1), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    _, single = build_train_loader(tiny_config("DATA.DATA_PATH", str(demo_data), "DATA.NUM_WORKERS", 1,
                                               "AUG.COLOR_JITTER", 0.4), ENV)
    for ours, theirs in zip(continued, epoch_batches(single, 1), strict=True):  # any number of workers
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(continued[0], epoch_batches(resumed, 2)[0])  # and each epoch augments anew
    # the last item, the main process's draw, matched too: starting the workers left its generator alone
