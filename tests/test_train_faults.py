"""Faults: a killed run resumes exactly, checkpoints load safely and save atomically, and bad input stops a run
with a message naming the culprit while an earlier run's output folder stays intact."""
from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from config import TrainingError, UsageError
from main import main
from models import ConfigError
from utils import latest_checkpoint, read_checkpoint

from tests.helpers import (LOG, REPO, assert_intact, check, demo_args, eval_summary, first_image,
                           flip_bytes_inside_largest_tensor, load, poisoned_copy, read_log, run_dir, start_main,
                           this_run, wait_for_line)

# Every random stream in play: augmentation in a DataLoader worker, random erasing, Mixup, drop-path.
RANDOM_OPTS = ("SAVE_FREQ", "1", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "1", "AUG.MIXUP", "0.8",
               "AUG.REPROB", "0.25", "MODEL.DROP_PATH_RATE", "0.1")


@pytest.mark.slow
def test_run_killed_in_epoch_three_resumes_to_the_same_weights(demo_data, tmp_path, entry_points):
    """3 epochs straight == 2 epochs, SIGKILL during the third, and the same command again, bit for bit (the
    EMA of the weights included). With SAVE_FREQ 5 no epoch file holds epoch 1: ckpt_last.pth does (without it the
    rerun started over at epoch 0, as only ckpt_best.pth was left). The killed run is a fresh process; the two that
    run to their end are forked ones (``entry_points``), in the same environment."""
    opts = ("TRAIN.EPOCHS", "3", "MODEL_EMA", "True", "MODEL_EMA_DECAY", "0.9", *RANDOM_OPTS, "SAVE_FREQ", "5")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    check(entry_points.main(demo_args(demo_data, straight, opts=opts)))
    assert "auto-resume (TRAIN.AUTO_RESUME): no checkpoint to resume from in" in read_log(straight)

    args = demo_args(demo_data, killed, opts=opts)
    proc = start_main(args)
    wait_for_line(proc, "Train: [2/3][1/10]")  # a step of the third epoch is done
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close(), proc.stderr.close()
    assert sorted(p.name for p in run_dir(killed).glob("*.pth")) == ["ckpt_best.pth", "ckpt_last.pth"]

    check(entry_points.main(args))
    log = this_run(read_log(killed))
    assert "auto-resuming from" in log and "ckpt_last.pth" in log and "Train: [1/3]" not in log
    assert sorted(p.name for p in run_dir(killed).glob("*.pth")) == ["ckpt_best.pth", "ckpt_epoch_2.pth"]
    expected, resumed = (load(run_dir(d) / "ckpt_epoch_2.pth") for d in (straight, killed))
    for key in ("model", "model_ema", "optimizer"):
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    for key in ("lr_scheduler", "max_accuracy", "epoch", "step"):
        assert resumed[key] == expected[key], key


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_INPUT = {
    "missing --data-path": (None, ("--data-path", ""), (), UsageError, r"--data-path \(DATA.DATA_PATH\) is required"),
    "missing val folder": (lambda d: shutil.rmtree(d / "val"), (), (), UsageError, r"has no 'val' folder"),
    "empty class folder": (lambda d: [p.unlink() for p in (d / "train" / "circle").iterdir()], (), (), UsageError,
                           r"1 class folder\(s\) hold no image .*train/circle"),
    "classes differ": (lambda d: (d / "val" / "circle").rename(d / "val" / "oval"), (), (), UsageError,
                       r"'train' and 'val' have different class folders \(only in train: circle; only in val: oval\)"),
    "zip member missing": (lambda d: (d / "train_map.txt").open("a").write("circle/gone.JPEG\t0\n"), ("--zip",),
                           (), UsageError, r"1 images listed in .*train_map.txt are not in .*train.zip, e.g. "
                                       r"circle/gone.JPEG"),
    "unknown key": (None, (), ("TRAIN.EPOCH", "3"), UsageError, r"Non-existent key: TRAIN.EPOCH"),
    "wrong type": (None, (), ("TRAIN.EPOCHS", "many"), UsageError, r"Type mismatch .* TRAIN.EPOCHS"),
    "eval without weights": (None, ("--eval",), ("TRAIN.AUTO_RESUME", "False"), UsageError,
                             r"--eval needs weights: pass --resume"),
    "accumulation 0": (None, ("--accumulation-steps", "0"), (), UsageError,
                       r"--accumulation-steps \(TRAIN.ACCUMULATION_STEPS\) must be at least 1"),
    "batch size 0": (None, ("--batch-size", "0"), (), UsageError,
                     r"--batch-size \(DATA.BATCH_SIZE\) must be at least 1"),
    "image size vs patch size": (None, (), ("DATA.IMG_SIZE", "30"), ConfigError,
                                 r"DATA.IMG_SIZE: must be a positive multiple of MODEL.FOCAL.PATCH_SIZE \(4\)"),
    "checkpoint of another model": (None, ("--resume", str(REPO / "tests" / "fixtures" / "small_fc_224.pth")), (),
                                    UsageError, r"checkpoint does not fit this model: unexpected 53 keys: .*, "
                                                r"\.\.\. \(53 in all\); mismatched shapes for 82 keys: .*"
                                                r"to fine-tune from other weights use --pretrained"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_by_name_and_damages_nothing(case, copy_of, data):
    damage, flags, opts, error, message = BAD_INPUT[case]
    output, before = copy_of
    if damage:
        damage(data)
    with pytest.raises(error, match=message) as info:
        main(demo_args(data, output, *flags, opts=opts))
    assert len(str(info.value)) < 1000 and "\n" not in str(info.value)  # a summary, not a wall of keys
    assert_intact(output, before)


@pytest.mark.slow
def test_unreadable_image_in_a_worker_is_one_line_naming_the_file(copy_of, data, entry_points):
    output, before = copy_of
    bad = first_image(data)
    truncate(bad)
    proc = entry_points.main(demo_args(data, output, opts=("TRAIN.EPOCHS", "2", "DATA.NUM_WORKERS", "1")))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"main.py: error: cannot read image {bad}: image file is truncated")
    assert proc.stderr.strip().endswith("set DATA.SKIP_BAD_IMAGES True to leave unreadable images out")
    assert "stopped: cannot read image" in read_log(output)  # the failure is in the run's log too
    assert_intact(output, before)  # config.yaml included: it is rewritten only after the first evaluation


def test_unreadable_images_can_be_skipped_and_are_counted(data, tmp_path):
    truncate(first_image(data, "train"))
    (first_image(data, "val")).write_bytes(b"not an image")
    main(demo_args(data, tmp_path, opts=("DATA.SKIP_BAD_IMAGES", "True")))
    log = read_log(tmp_path)
    assert f"skipping unreadable image {first_image(data, 'train')}" in log
    assert "1 unreadable training images were skipped (DATA.SKIP_BAD_IMAGES)" in log
    assert "1 unreadable validation images were skipped" in log
    assert eval_summary(log)["counted"] == 19


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(demo_data, tmp_path):
    # The step schedule multiplies the learning rate by 1e38 after the first epoch: the weights blow up.
    opts = ("TRAIN.EPOCHS", "3", "SAVE_FREQ", "1", "TRAIN.LR_SCHEDULER.NAME", "step",
            "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "1", "TRAIN.LR_SCHEDULER.DECAY_RATE", "1e38")
    with pytest.raises(TrainingError, match=r"the loss is nan at epoch 1, step \d+ of 5: stopping. The last good "
                                            r"checkpoint is .*ckpt_epoch_0.pth"):
        main(demo_args(demo_data, tmp_path, opts=opts))
    assert sorted(p.name for p in run_dir(tmp_path).glob("*.pth")) == ["ckpt_best.pth", "ckpt_epoch_0.pth"]
    assert all(torch.isfinite(w).all() for w in load(run_dir(tmp_path) / "ckpt_epoch_0.pth")["model"].values())


def test_tensorboard_without_the_package_is_a_clear_error(copy_of, data, monkeypatch):
    output, before = copy_of
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UsageError, match=r"--tensorboard \(TENSORBOARD\) needs the tensorboard package: "
                                         r"pip install tensorboard"):
        main(demo_args(data, output, "--tensorboard", opts=("TRAIN.EPOCHS", "2")))
    assert_intact(output, before)


class CreatesFile:
    """What a malicious checkpoint carries: unpickling it calls ``open(path, "w")``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_checkpoint_is_refused_unless_explicitly_allowed(previous_run, copy_of, data, tmp_path):
    output, before = copy_of
    marker = tmp_path / "created-by-unpickling"
    weights = load(run_dir(previous_run) / "ckpt_epoch_0.pth")["model"]
    evil = tmp_path / "evil.pth"
    torch.save({"model": weights, "payload": CreatesFile(marker)}, evil)
    with pytest.raises(UsageError, match=r"refusing to load checkpoint .*evil.pth: it needs io.open; "
                                         r"--unsafe-load unpickles it anyway, which runs whatever code"):
        main(demo_args(data, output, "--eval", "--resume", str(evil)))
    assert not marker.exists()
    assert_intact(output, before)
    # An old-style bare pickle is refused too.
    bare = tmp_path / "bare.pth"
    bare.write_bytes(pickle.dumps({"model": weights, "payload": CreatesFile(marker)}))
    with pytest.raises(UsageError, match=r"bare.pth: it is not a tensors-only PyTorch checkpoint; --unsafe-load"):
        read_checkpoint(str(bare), LOG)
    assert not marker.exists()
    # The opt-in does what it warns about: the file's code runs.
    main(demo_args(data, output, "--eval", "--unsafe-load", "--resume", str(evil)))
    assert marker.exists() and "--unsafe-load: fully unpickling" in read_log(output)


DAMAGE = {  # what happens to a newest checkpoint, and how auto-resume names it as it passes over it
    "killed mid-copy": (lambda good, path: path.write_bytes(good[: len(good) // 2]), "cannot read checkpoint"),
    "disk full": (lambda good, path: path.write_bytes(b""), "cannot read checkpoint"),
    "a text file": (lambda good, path: path.write_text("not a checkpoint"), "it is not a PyTorch checkpoint"),
    "flipped bytes": (lambda good, path: (path.write_bytes(good), flip_bytes_inside_largest_tensor(path)),
                      "is damaged: its content does not match"),
    "NaN weights": (lambda good, path: poisoned_copy(good, path), "holds non-finite values"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_auto_resume_passes_over_a_damaged_newest_checkpoint(damage, previous_run, tmp_path, caplog):
    good = run_dir(previous_run) / "ckpt_epoch_0.pth"
    shutil.copy(good, tmp_path / "ckpt_epoch_0.pth")
    make, reason = DAMAGE[damage]
    make(good if damage == "NaN weights" else good.read_bytes(), tmp_path / "ckpt_epoch_1.pth")
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert latest_checkpoint(str(tmp_path), LOG).path == str(tmp_path / "ckpt_epoch_0.pth")
    assert f"auto-resume skips {tmp_path / 'ckpt_epoch_1.pth'}" in caplog.text and reason in caplog.text


def test_auto_resume_goes_back_to_a_good_checkpoint_and_rewrites_the_damaged_ones(copy_of, data):
    """A run whose newest checkpoints are damaged resumes from the newest good one, writes the later epochs whole
    again, and removes what a save killed mid-write left."""
    output, _ = copy_of
    folder = run_dir(output)
    good = (folder / "ckpt_epoch_0.pth").read_bytes()
    (folder / "ckpt_epoch_1.pth").write_bytes(good[: len(good) // 2])
    (folder / "ckpt_epoch_2.pth").write_bytes(b"")
    stale = folder / ".ckpt_epoch_1.pth.4242.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    main(demo_args(data, output, opts=("TRAIN.EPOCHS", "2")))
    log = this_run(read_log(output))
    assert f"auto-resuming from {folder / 'ckpt_epoch_0.pth'}" in log and "Train: [1/2]" in log
    assert load(folder / "ckpt_epoch_1.pth")["epoch"] == 1  # rewritten whole: the empty epoch 2 is passed over
    assert latest_checkpoint(str(folder), LOG).path == str(folder / "ckpt_epoch_1.pth")
    assert (folder / "ckpt_epoch_0.pth").read_bytes() == good and not stale.exists() and f"removed {stale}" in log


# How a full disk reaches torch.save: an OSError from a plain write, or (torch's zip writer, as measured on a 2 MB
# tmpfs) a RuntimeError about stream positions, which only the free space explains.
DISK_FULL = {"ENOSPC": OSError(28, "No space left on device"),
             "zip writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")}


@pytest.mark.parametrize("failure", DISK_FULL)
def test_a_crash_while_saving_leaves_no_partial_checkpoint(copy_of, data, monkeypatch, failure):
    output, before = copy_of

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise DISK_FULL[failure]

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2 ** 20, 10 * 2 ** 20, 4096))
    with pytest.raises(TrainingError, match=r"cannot save checkpoint .*ckpt_epoch_1.pth: no space left on the device "
                                            r"\(0 MB free, the checkpoint needs about \d+ MB\); nothing was written"):
        main(demo_args(data, output, opts=("TRAIN.EPOCHS", "2")))
    assert_intact(output, before, may_change=("config.yaml",))  # no ckpt_epoch_1.pth, no temporary file


def test_a_failed_save_with_room_left_gives_the_writer_s_reason(copy_of, data, monkeypatch):
    output, _ = copy_of

    def failing(obj, path, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(TrainingError, match=r"ckpt_epoch_1.pth: PytorchStreamWriter failed writing file data/3: file "
                                            r"write failed; nothing was written"):
        main(demo_args(data, output, opts=("TRAIN.EPOCHS", "2")))


def test_a_sigterm_landing_while_a_failure_is_logged_is_still_logged(demo_data, tmp_path, monkeypatch):
    """The race behind a dead rank: its collective fails on rank 0 as torchrun's SIGTERM arrives, and Python may
    run the handler at the first call of the failure's own logging, whose exception then replaces it."""
    import main as entry
    import logger as run_logger

    def lost_rank(*args):
        raise RuntimeError("Connection closed by peer")
    log_failure = logging.Logger.exception

    def handler_runs_first(self, *args, **kwargs):
        run_logger.exit_on_signal(signal.SIGTERM, None)
        log_failure(self, *args, **kwargs)
    monkeypatch.setattr(entry, "run_mode", lost_rank)
    monkeypatch.setattr(logging.Logger, "exception", handler_runs_first)
    with pytest.raises(SystemExit):
        main(demo_args(demo_data, tmp_path))
    assert read_log(tmp_path).count("stopped: terminated by SIGTERM") == 1


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_and_the_same_command_resumes(demo_data, tmp_path, entry_points):
    """A rank killed, then torchrun itself stopped (SIGTERM, as a scheduler or ``kill`` does), and the same command
    resumes after each."""
    args = demo_args(demo_data, tmp_path, opts=("TRAIN.EPOCHS", "3", *RANDOM_OPTS[:6]))
    proc = start_main(args, nproc=2)
    wait_for_line(proc, "Train: [1/3][0/5]")
    pid = int(read_log(tmp_path, rank=1).split("pid ")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=90) != 0  # torchrun notices at once and stops rank 0: no collective timeout
    stderr = proc.stderr.read()
    proc.stdout.close(), proc.stderr.close()
    assert "Signal 9 (SIGKILL)" in stderr or "SIGKILL" in stderr
    # Rank 0 logs why it stopped: gloo's lost connection to rank 1, or torchrun's SIGTERM, whichever comes first.
    rank0 = read_log(tmp_path, rank=0)
    assert re.search(r"stopped: (rank 0 lost its connection to the other ranks: rank 1 \(pid \d+\) ended|terminated "
                     r"by SIGTERM \(torchrun stops all ranks)", rank0), rank0
    # The one traceback left is torchrun's own report (ChildFailedError), which names the killed rank.
    assert "Traceback" not in rank0 and stderr.count("Traceback") <= stderr.count("ChildFailedError:"), stderr

    # torchrun stops each rank's process group: the DataLoader workers die with their rank, which printed a
    # traceback per worker ("Exception ignored in ... __del__") after its stop line
    proc = start_main(args, nproc=2)
    wait_for_line(proc, "Train: [1/3][0/5]")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert stdout.strip().splitlines()[-1].endswith("stopped: terminated by SIGTERM (torchrun stops all ranks when "
                                                    "one fails or is stopped)"), stdout[-2000:]
    assert "DataLoader" not in stderr and "Exception ignored" not in stderr, stderr
    assert read_log(tmp_path, rank=1).strip().endswith("stopped: terminated by SIGTERM (torchrun stops all ranks "
                                                       "when one fails or is stopped)")

    check(entry_points.main(args, nproc=2))
    for rank in (0, 1):
        log = this_run(read_log(tmp_path, rank))
        assert "auto-resuming from" in log and "ckpt_epoch_0.pth" in log and "Train: [1/3]" in log
    assert load(run_dir(tmp_path) / "ckpt_epoch_2.pth")["epoch"] == 2


def test_resuming_with_model_ema_added_tracks_the_best_of_the_ema_model(copy_of, data):
    """A run resumed with --model-ema added reported "Max accuracy (EMA)" as the plain model's earlier best and
    kept ckpt_best.pth on the plain model's epoch: the best is now tracked per model it names."""
    output, _ = copy_of
    main(demo_args(data, output, "--model-ema", opts=("TRAIN.EPOCHS", "2")))
    log = this_run(read_log(output))
    assert "best score is its network's; this run's best is its EMA model's, which starts afresh" in log
    ema = [float(a) for a in re.findall(r"Accuracy of the EMA model on the \d+ test images: ([\d.]+)%", log)]
    best = [float(a) for a in re.findall(r"Max accuracy \(EMA\): ([\d.]+)%", log)]
    assert len(ema) == len(best) == 1 and best[0] == pytest.approx(ema[0], abs=0.05)  # logged to 0.1 and 0.01
    assert load(run_dir(output) / "ckpt_best.pth")["epoch"] == 1
