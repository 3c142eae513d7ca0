"""``main.py`` end to end on CPU, as real subprocesses: one process, and torchrun with two and three (gloo). Runs
that go to their end are forked children of one process that imported torch once (``entry_points``); torchrun's
ranks are fresh processes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import DEMO_CFG, REPO, check, demo_args, eval_summary, read_log, run_dir, sum_roundoff

pytestmark = pytest.mark.slow  # every test runs main.py as a subprocess, or uses a run made so


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory, entry_points) -> Path:
    """One process trains one epoch (folder layout, accumulation and gradient checkpointing on) and saves."""
    output = tmp_path_factory.mktemp("single")
    check(entry_points.main(demo_args(demo_data, output, "--accumulation-steps", "2", "--use-checkpoint")))
    return output


def test_single_process_trains_saves_and_evaluates(trained):
    log = read_log(trained)
    assert "rank 0 of 1 on cpu" in log
    # 40 images in batches of 8: 5 batches, 2 updates of 2 micro-batches, the fifth batch skipped.
    assert "Train: [0/1][3/4]" in log and "Train: [0/1][4/" not in log
    assert "grad_norm" in log and "eta" in log and "mem" in log
    summary = eval_summary(log)
    assert summary["images"] == summary["counted"] == 20
    checkpoint = torch.load(run_dir(trained) / "ckpt_epoch_0.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["max_accuracy"] == pytest.approx(float(summary["acc1"]))
    assert {"model", "optimizer", "lr_scheduler", "scaler", "config"} <= checkpoint.keys()
    assert checkpoint["optimizer"]["state"][0]["step"].item() == 2
    assert "IMG_SIZE: 32" in (run_dir(trained) / "config.yaml").read_text()


def test_two_and_three_process_eval_equal_single_process(trained, demo_data, tmp_path, entry_points):
    checkpoint = str(run_dir(trained) / "ckpt_epoch_0.pth")
    flags = ("--eval", "--resume", checkpoint)
    odd_batches = ("DATA.BATCH_SIZE", "3")  # 10 images per rank: batches of 3, 3, 3, 1
    # 3 ranks: unequal shards of 7, 7 and 6 images, whose counts and sums must still add up exactly
    single, double, triple = (
        eval_summary(check(entry_points.main(demo_args(demo_data, tmp_path / name, *flags, opts=odd_batches),
                                             nproc)).stdout)
        for name, nproc in (("one", 1), ("two", 2), ("three", 3)))
    assert "backend gloo" in read_log(tmp_path / "two", rank=1)
    assert single["counted"] == double["counted"] == triple["counted"] == 20
    for multi in (double, triple):
        assert (single["acc1"], single["acc5"]) == (multi["acc1"], multi["acc5"])
        # two values printed to 4 decimals (half the last digit each), from float32 sums over the 20 images
        # grouped by rank instead of by batch
        assert multi["loss"] == pytest.approx(single["loss"], abs=2 * 5e-5 + sum_roundoff(torch.float32, 20) *
                                              single["loss"])


def test_torchrun_trains_from_zip_with_part_cache(demo_data, tmp_path, entry_points):
    check(entry_points.main(demo_args(demo_data, tmp_path, "--zip", "--cache-mode", "part"), nproc=2))
    for rank in (0, 1):
        log = read_log(tmp_path, rank)
        assert f"rank {rank} of 2 on cpu, backend gloo" in log
        # Each rank caches only its half of the 40 training images, and of the 20 validation images.
        assert "cached 20/20 images of" in log and "train.zip (part mode)" in log
        assert "cached 10/10 images of" in log
        assert "Train: [0/1][1/2]" in log  # 20 images per rank in batches of 8
    assert eval_summary(read_log(tmp_path, 0))["counted"] == 20
    assert (run_dir(tmp_path) / "ckpt_epoch_0.pth").is_file()


def test_auto_resume_continues_from_saved_epoch(trained, demo_data, tmp_path, entry_points):
    shutil.copytree(run_dir(trained), run_dir(tmp_path))
    check(entry_points.main(demo_args(demo_data, tmp_path, "--accumulation-steps", "2",
                             opts=("TRAIN.EPOCHS", "2"))))
    log = read_log(tmp_path).split("rank 0 of 1")[-1]  # this run's part of the appended log
    assert "auto-resuming from" in log and "ckpt_epoch_0.pth" in log
    assert "Train: [1/2]" in log and "Train: [0/2]" not in log
    checkpoint = torch.load(run_dir(tmp_path) / "ckpt_epoch_1.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["optimizer"]["state"][0]["step"].item() == 4


def test_eval_resume_of_official_layout_checkpoint(demo_data_224, tmp_path, entry_points):
    fixture = json.loads((REPO / "tests" / "fixtures" / "small_fc_224.json").read_text())
    opts = ["MODEL.NUM_CLASSES", str(fixture["num_classes"]), "DATA.IMG_SIZE", str(fixture["img_size"]),
            "DATA.BATCH_SIZE", "5", "DATA.NUM_WORKERS", "0"]
    for key, value in fixture["focal"].items():
        opts += [f"MODEL.FOCAL.{key}", str(value)]
    proc = check(entry_points.main(["--cfg", str(REPO / "configs" / "focal_tiny_patch4_window7_224.yaml"),
                                    "--data-path", str(demo_data_224), "--output", str(tmp_path), "--eval",
                                    "--resume", str(REPO / "tests" / "fixtures" / "small_fc_224.pth"), "--opts",
                                    *opts]))
    assert "resumed weights from" in proc.stdout and "all keys matched" in proc.stdout
    summary = eval_summary(proc.stdout)
    assert summary["images"] == summary["counted"] == 10


def test_throughput_runs_without_data_and_times_swin_t_alike(tmp_path, entry_points):
    proc = check(entry_points.main(["--cfg", DEMO_CFG, "--throughput", "3", "--batch-size", "4", "--output",
                                    str(tmp_path), "--opts", "DATA.IMG_SIZE", "32"]))
    assert "no --data-path: timing random 32x32 input" in proc.stdout
    rates = [float(r) for r in re.findall(r"batch_size 4 throughput ([\d.]+) images/s", proc.stdout)]
    assert len(rates) == 2 and "the same for timm's swin_tiny_patch4_window7_224 at this batch and size" in proc.stdout
    ratio = float(re.search(r"focal_demo_patch4_window4_32: ([\d.]+)x the throughput of "
                            r"swin_tiny_patch4_window7_224", proc.stdout)[1])
    assert ratio == pytest.approx(rates[0] / rates[1], rel=0.01)  # the figures are printed to 0.01


def test_usage_errors_are_short_messages(tmp_path, entry_points):
    proc = entry_points.main(["--cfg", DEMO_CFG, "--output", str(tmp_path)])
    assert proc.returncode != 0
    assert "main.py: error: --data-path" in proc.stderr and "Traceback" not in proc.stderr


def test_pretrained_starts_a_new_run_from_the_weights(trained, demo_data, tmp_path):
    """In process: ``--pretrained`` loads weights only, so training starts over at epoch 0; ``--eval
    --pretrained`` scores the same weights as ``--eval --resume``."""
    from main import main

    checkpoint = str(run_dir(trained) / "ckpt_epoch_0.pth")
    main(demo_args(demo_data, tmp_path / "finetune", "--pretrained", checkpoint))
    log = read_log(tmp_path / "finetune")
    assert re.search(r"pretrained \S+ckpt_epoch_0.pth: (\d+) of its \1 tensors loaded; 0 resized; 0 derived from its "
                     r"tables; 0 left at initial values: none", log)
    assert "Train: [0/1]" in log and "auto-resuming" not in log
    main(demo_args(demo_data, tmp_path / "eval", "--eval", "--pretrained", checkpoint))
    assert eval_summary(read_log(tmp_path / "eval"))["acc1"] == eval_summary(read_log(trained))["acc1"]


def test_tensorboard_events_hold_loss_lr_and_accuracy(demo_data, tmp_path, entry_points):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    check(entry_points.main(demo_args(demo_data, tmp_path, "--tensorboard")))
    events = EventAccumulator(str(run_dir(tmp_path)))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "val/acc1", "val/acc5", "val/loss"} <= tags, tags
    updates = [e.step for e in events.Scalars("train/loss")]  # every update of the epoch, on one axis with val/*
    assert updates == list(range(1, len(updates) + 1)) and len(updates) > 1
    lr_steps = [e.step for e in events.Scalars("train/lr")]
    assert lr_steps == [e.step for e in events.Scalars("train/grad_norm")] == updates
    acc1 = events.Scalars("val/acc1")
    assert [e.step for e in acc1] == [updates[-1]]
    assert acc1[0].value == pytest.approx(float(eval_summary(read_log(tmp_path))["acc1"]), abs=1e-3)
