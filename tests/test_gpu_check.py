"""``make gpu-check`` on a machine without a GPU: one clear line and a non-zero exit, nothing else; its log parser
on the lines a real CPU epoch prints; and its detector step, run on the CPU."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from models import build_model
from tests.helpers import CPU, REPO, fake_batches, tiny_config


@pytest.mark.slow
def test_fails_clearly_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU")


def test_log_patterns_parse_what_the_engine_prints(caplog):
    """gpu_check reads the training loss and the accuracy from the lines engine.py logs: here those lines come from
    a real CPU epoch and evaluation of the demo model, and what the patterns read must be what the engine
    returned."""
    from engine import build_precision, classification_losses, evaluate, train_one_epoch
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    from tools.gpu_check import EVAL, LOSS

    config = tiny_config("MODEL.LABEL_SMOOTHING", 0.0)
    batches = fake_batches(3)
    precision = build_precision("none", CPU)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    with caplog.at_level(logging.INFO, logger="focal.engine"):
        stats = train_one_epoch(config, model, classification_losses(nn.CrossEntropyLoss()), batches, 3, optimizer,
                                build_scheduler(config, optimizer, 3), precision, 0, CPU)
        result = evaluate(config, model, batches, precision, CPU)
    losses = LOSS.findall(caplog.text)
    # Printed values: the loss to 4 decimals, the accuracies to 3; each within half its last digit.
    assert len(losses) == 3 and float(losses[-1]) == pytest.approx(stats.loss, abs=5e-5)
    (printed,) = [tuple(map(float, m)) for m in EVAL.findall(caplog.text)]
    assert printed[:2] == pytest.approx((result.acc1, result.acc5), abs=5e-4)
    assert printed[2] == pytest.approx(result.loss, abs=5e-5)


@pytest.mark.slow
def test_detector_check_runs_every_detector_on_the_given_device(capsys):
    """make gpu-check's detector step, here on the CPU with each detector's demo config: it trains a step and
    detects with every one, and names the detectors."""
    from tools.gpu_check import check_detectors
    demos = sorted(str(p) for p in (REPO / "configs" / "detection").glob("*demo.yaml"))
    assert check_detectors(torch.device("cpu"), (256, 320), demos)
    assert f"PASS  detectors: {len(demos)}/{len(demos)} detectors trained a step and detected on cpu" in \
        capsys.readouterr().out
