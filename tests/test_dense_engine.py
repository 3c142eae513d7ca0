"""engine.train_one_epoch over named losses (the dense tasks' case): values read once per print interval yet every
update reaches TensorBoard, a non-finite loss named with its step and each part, and the weight average kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from config import TrainingError, merge_opts
from dense.config import dense_defaults
from engine import build_precision, train_one_epoch
from logger import scalars_to
from lr_scheduler import build_dense_scheduler
from tests.helpers import CPU


class Recorder:
    """A TensorBoard writer that keeps what it is given."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))


def setup(steps, print_freq, bad_step=None):
    config = dense_defaults()
    merge_opts(config, ["PRINT_FREQ", print_freq, "TRAIN.EPOCHS", 2, "TRAIN.WARMUP_ITERS", 0])
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 4), torch.randn(2, 1)) for _ in range(steps)]

    def losses(net, batch, device):
        x, y = batch
        out = net(x)
        named = {"loss_a": ((out - y) ** 2).mean(), "loss_b": out.abs().mean()}
        if bad_step is not None and batch is batches[bad_step]:
            named["loss_b"] = named["loss_b"] * float("nan")
        return named

    return config, model, optimizer, batches, losses


def test_every_update_reaches_tensorboard_with_one_read_per_interval(monkeypatch):
    config, model, optimizer, batches, losses = setup(steps=7, print_freq=3)
    reads = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(self.shape) or original(self, *a, **k))
    writer = Recorder()
    ema = ModelEmaV3(model, decay=0.5)
    # The average it should keep, from the weights after every update: e <- 0.5 e + 0.5 w, starting from the model's.
    expected = [model.weight.detach().clone()]
    optimizer.register_step_post_hook(lambda *_: expected.append(0.5 * expected[-1] + 0.5 * model.weight.detach()))
    stats = train_one_epoch(config, model, losses, batches, 7, optimizer, build_dense_scheduler(config, optimizer, 7),
                            build_precision("none", CPU), 1, CPU, ema, model, scalars_to(writer))
    # Printed at steps 0, 3, 6 (and the last, 6): three reads of the stacked values, of 1, 3 and 3 updates.
    assert reads == [(1, 4), (3, 4), (3, 4)]
    assert sorted(writer.scalars) == ["train/grad_norm", "train/loss", "train/loss_a", "train/loss_b", "train/lr"]
    for tag, values in writer.scalars.items():
        assert [step for step, _ in values] == list(range(8, 15)), tag  # epoch 1 of 7 updates: updates 8-14
    totals = [v for _, v in writer.scalars["train/loss"]]
    parts = [a + b for (_, a), (_, b) in zip(writer.scalars["train/loss_a"], writer.scalars["train/loss_b"])]
    assert totals == pytest.approx(parts) and stats.loss == pytest.approx(sum(totals) / 7)
    assert len(expected) == 8 and not torch.equal(ema.module.weight, model.weight)
    torch.testing.assert_close(ema.module.weight, expected[-1])  # float32's default: the same few roundings


def test_non_finite_loss_is_named_with_its_update_by_the_end_of_its_interval():
    config, model, optimizer, batches, losses = setup(steps=9, print_freq=4, bad_step=5)
    seen = []
    counting = lambda net, batch, device: seen.append(1) or losses(net, batch, device)  # noqa: E731
    with pytest.raises(TrainingError, match=r"the loss is nan at epoch 0, step 5 of 9 \(loss_a [\d.]+, loss_b nan\)"):
        train_one_epoch(config, model, counting, batches, 9, optimizer, build_dense_scheduler(config, optimizer, 9),
                        build_precision("none", CPU), 0, CPU)
    assert len(seen) == 9  # the interval of steps 5-8 is read after step 8
