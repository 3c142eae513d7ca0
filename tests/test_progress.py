"""Progress on long work: evaluation, training and throughput loops report at least every REPORT_SECONDS with an
ETA, whatever PRINT_FREQ says, the epoch line estimates the rest of the run, and --throughput takes its passes."""
from __future__ import annotations

import logging
import re
import sys
import time

import pytest
import torch
import torch.nn as nn

import engine
from engine import build_precision, evaluate
import logger as progress  # the module whose REPORT_SECONDS the loops read
from tests.helpers import CPU, DEMO_CFG, read_log, tiny_config

TEST_LINE = re.compile(r"Test: \[(\d+)/10\] eta \d+:\d\d:\d\d\t")


class Slow(nn.Module):
    """Three classes, a fixed pause per batch: an evaluation that takes a while."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return images.flatten(1)[:, :3]


def test_long_evaluation_reports_progress_with_an_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.05)
    config = tiny_config("PRINT_FREQ", 1000)
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])) for _ in range(10)]
    with caplog.at_level(logging.INFO, "focal.engine"):
        evaluate(config, Slow(), batches, build_precision("none", CPU), CPU)
    reported = [int(i) for i in TEST_LINE.findall(caplog.text)]
    assert reported[0] == 0 and reported[-1] == 9
    assert any(0 < i < 9 for i in reported), caplog.text  # between PRINT_FREQ lines, because time passed
    assert "Acc@5" not in caplog.text  # three classes: top-5 would always be 100%


def test_epoch_line_estimates_the_rest_of_the_run(previous_run):
    assert "EPOCH 0 done (training, evaluation, checkpoints); 0 of 1 epochs left, run eta 0:00:00" in \
        read_log(previous_run)


@pytest.mark.slow
def test_throughput_takes_the_number_of_passes(tmp_path):
    from main import main
    main(["--cfg", DEMO_CFG, "--output", str(tmp_path), "--throughput", "2", "--channels-last", "--opts",
          "DATA.IMG_SIZE", "32"])
    log = read_log(tmp_path)
    assert "convolution weights in channels-last (NHWC) layout (--channels-last)" in log
    assert "throughput averaged over 2 forward passes (after 2 untimed)" in log
    assert re.search(r"Throughput: \[3/4\] eta \d+:\d\d:\d\d\ttimed", log)


def test_benchmark_warns_when_timings_are_too_few_or_too_noisy():
    from tools.benchmark import timing_warning
    assert "only 3 repetitions" in timing_warning("focal", [1.0, 1.0, 1.0])
    assert "spans 40% of the median" in timing_warning("focal", [1.0, 1.0, 1.5, 1.5, 1.0, 1.5])  # (1.5 - 1) / 1.25
    assert timing_warning("focal", [1.0, 1.01, 0.99, 1.0, 1.02]) is None


def test_training_reads_the_device_only_at_progress_lines(monkeypatch):
    """Losses, gradient norms and the scale stay on the device between progress lines: the number of reads back
    to the host does not grow with the number of steps (with clipping off, as with it on)."""
    from tests.helpers import fake_batches, run_epoch
    monkeypatch.setattr(progress, "REPORT_SECONDS", 1e9)
    reads = []

    def counted(original):
        def read(self, *args):
            if sys._getframe(1).f_code.co_filename == engine.__file__:  # the training loop's own reads
                reads.append(original.__name__)
            return original(self, *args)
        return read
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    precision = build_precision("none", CPU)
    counts = {}
    for clip in (0.0, 5.0):
        for steps in (3, 8):
            reads.clear()
            run_epoch(tiny_config("PRINT_FREQ", 1000, "TRAIN.CLIP_GRAD", clip), fake_batches(steps), precision)
            counts[clip, steps] = len(reads)
    assert counts[0.0, 3] == counts[0.0, 8] and counts[5.0, 3] == counts[5.0, 8], counts
