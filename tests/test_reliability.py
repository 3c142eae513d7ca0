"""No silent wrong training, no silent overwrite, one clear line for every bad input (issue #13).

In-process runs of ``main`` where the error type is enough; real subprocesses where the promise is about the
process itself (exit status, one stderr line, signals, a second concurrent run)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from config import UsageError, load_config
from data.datasets import to_rgb
from lr_scheduler import build_scheduler, scale_rates
from main import main
from models import build_model
from optimizer import build_optimizer

from tests.helpers import (DEMO_CFG, MAIN_ENV, REPO, TINY_OPTS, assert_intact, demo_args, eval_summary,
                           first_image, load, read_log, run_dir, snapshot, start_main, this_run,
                           wait_for_line)


def logged_rates(log: str, epoch: int) -> list:
    """The learning rate printed with each step of ``epoch``."""
    return [float(r) for r in re.findall(rf"Train: \[{epoch}/\d+\]\[\d+/\d+\]\s+eta \S+ lr ([\d.e-]+)", log)]


def schedule_rate(opts: tuple, update: int, updates_per_epoch: int) -> float:
    """What the schedule of the demo config with ``opts`` gives at ``update``, built independently of main."""
    config = load_config(DEMO_CFG, [*TINY_OPTS, *opts])
    scale_rates(config, config.DATA.BATCH_SIZE * config.TRAIN.ACCUMULATION_STEPS)
    optimizer = build_optimizer(config, build_model(config))
    scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    scheduler.step_update(update)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.slow
def test_resume_follows_the_schedule_of_the_new_config(demo_data, tmp_path):
    """A lower BASE_LR and more epochs on resume are obeyed (both were silently ignored), and said in the log."""
    first = ("TRAIN.EPOCHS", "2", "SAVE_FREQ", "1")
    main(demo_args(demo_data, tmp_path, opts=first))
    changed = ("TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "1.6e-3", "SAVE_FREQ", "1")
    main(demo_args(demo_data, tmp_path, opts=changed))
    log = this_run(read_log(tmp_path))
    assert "resuming with a changed config: " in log
    assert re.search(r"TRAIN.BASE_LR 0.00025\d* -> 2.5e-05\d*;", log) and "TRAIN.EPOCHS 2 -> 4" in log  # x 8/512
    assert "Train: [1/" not in log and "Train: [3/4]" in log
    for epoch in (2, 3):
        rates = logged_rates(log, epoch)
        expected = [schedule_rate(changed, epoch * 5 + step + 1, 5) for step in range(len(rates))]  # after it
        assert rates == pytest.approx(expected, rel=5e-4), epoch  # printed with 4 digits: half the last one
    assert load(run_dir(tmp_path) / "ckpt_epoch_3.pth")["optimizer"]["param_groups"][0]["initial_lr"] == \
        pytest.approx(2.5e-05)


def test_resume_with_another_optimizer_or_after_the_last_epoch_is_refused(demo_data, tmp_path):
    main(demo_args(demo_data, tmp_path))
    before = snapshot(tmp_path)
    sgd = ("TRAIN.EPOCHS", "2", "TRAIN.OPTIMIZER.NAME", "sgd")
    with pytest.raises(UsageError, match=r"^auto-resume from .*ckpt_epoch_0.pth \(TRAIN.AUTO_RESUME\): it was trained "
                                         r"with TRAIN.OPTIMIZER.NAME adamw, this run asks for sgd, .*--pretrained "
                                         r".*ckpt_epoch_0.pth, or start a new run under another --tag or --output$"):
        main(demo_args(demo_data, tmp_path, opts=sgd))
    named = str(run_dir(tmp_path) / "ckpt_epoch_0.pth")
    with pytest.raises(UsageError, match=r"^--resume .*ckpt_epoch_0.pth: it was trained with TRAIN.OPTIMIZER.NAME "
                                         r"adamw, this run asks for sgd, .*--pretrained .*ckpt_epoch_0.pth$"):
        main(demo_args(demo_data, tmp_path, "--resume", named, opts=sgd))
    with pytest.raises(UsageError, match=r"ckpt_epoch_0.pth has already trained 1 of TRAIN.EPOCHS 1 epochs: "
                                         r"nothing to train"):
        main(demo_args(demo_data, tmp_path))
    assert_intact(tmp_path, before)


BAD_VALUES = {
    "TRAIN.CLIP_GRAD -1": r"TRAIN.CLIP_GRAD must be 0 or more .*got -1.0",
    "TRAIN.EPOCHS 0": r"TRAIN.EPOCHS must be at least 1, got 0",
    # one class: the softmax is always 1, so the loss and every gradient are 0; a run 'trained' to 100% accuracy
    "MODEL.NUM_CLASSES 1": r"MODEL.NUM_CLASSES must be at least 2 to train or evaluate .*got 1",
    "TRAIN.EPOCHS -3": r"TRAIN.EPOCHS must be at least 1, got -3",
    "TRAIN.START_EPOCH 1": r"TRAIN.START_EPOCH must be below TRAIN.EPOCHS .*got 1",
    "TRAIN.BASE_LR -1.0": r"TRAIN.BASE_LR must be above 0, got -1.0",
    "DATA.NUM_WORKERS -1": r"DATA.NUM_WORKERS must be 0 .*got -1",
    "DATA.INTERPOLATION foo": r"DATA.INTERPOLATION must be one of \('bicubic'.*got 'foo'",
    "SEED -1": r"--seed \(SEED\) must be 0 or more, got -1",
    "MODEL.FOCAL.IN_CHANS 1": r"MODEL.FOCAL.IN_CHANS must be 3 to train or evaluate: images are read as RGB, got 1",
    "AUG.REPROB 1.5": r"AUG.REPROB must be a probability in \[0, 1\], got 1.5",
    "TRAIN.OPTIMIZER.NAME adam": r"TRAIN.OPTIMIZER.NAME must be one of \('adamw', 'sgd'\), got 'adam'",
    "AMP_OPT_LEVEL fp8": r"--amp \(AMP_OPT_LEVEL\) must be one of \('bf16', 'fp16', 'none', 'O0', 'O1', 'O2'\)",
}


@pytest.mark.parametrize("opts", BAD_VALUES)
def test_out_of_range_values_are_refused_up_front(opts, demo_data, copy_of):
    """Refused before the run touches the output of an earlier one."""
    output, before = copy_of
    with pytest.raises(UsageError, match=r"^config \(--cfg .*\): " + BAD_VALUES[opts]):
        main(demo_args(demo_data, output, opts=opts.split()))
    assert_intact(output, before)


def test_eval_names_the_class_count_the_weights_need(previous_run, demo_data, tmp_path):
    """--eval of a checkpoint under another MODEL.NUM_CLASSES listed the head's mismatched shapes and advised
    --pretrained, which --eval then refuses for leaving the head random; MODEL.NUM_CLASSES 0 (no head) got as far
    as matching class folders and blamed the checkpoint for storing no class names."""
    checkpoint = str(run_dir(previous_run) / "ckpt_epoch_0.pth")
    with pytest.raises(UsageError, match=r"^--resume .*ckpt_epoch_0.pth: it classifies 10 classes and "
                                         r"MODEL.NUM_CLASSES is 3; evaluate it with --opts MODEL.NUM_CLASSES 10$"):
        main(demo_args(demo_data, tmp_path / "three", "--eval", "--resume", checkpoint,
                       opts=("MODEL.NUM_CLASSES", "3")))
    with pytest.raises(UsageError, match=r"MODEL.NUM_CLASSES must be at least 2 to train or evaluate \(0 builds "
                                         r"the model without a classifier head; .*\), got 0"):
        main(demo_args(demo_data, tmp_path / "none", "--eval", "--pretrained", checkpoint,
                       opts=("MODEL.NUM_CLASSES", "0")))


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_a_killed_one_leaves_no_lock(demo_data, tmp_path):
    args = demo_args(demo_data, tmp_path, opts=("TRAIN.EPOCHS", "50"))
    proc = start_main(args)
    try:
        wait_for_line(proc, "Train: [0/50]")
        with pytest.raises(UsageError, match=rf"--output: .*default is in use by another run \(pid {proc.pid}\)"):
            main(args)
        assert read_log(tmp_path).count("rank 0 of 1") == 1  # the refused run wrote nothing, not even its log
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close(), proc.stderr.close()
    main(demo_args(demo_data, tmp_path, opts=("TRAIN.EPOCHS", "1")))  # the dead run's lock is gone with it
    assert not any(p.name.startswith(".lock") for p in run_dir(tmp_path).iterdir())


def other_architecture(path: Path) -> None:
    torch.save({"model": nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 10)).state_dict()}, path)


def test_pretrained_weights_that_fit_little_or_leave_the_head_random_in_eval_are_refused(demo_data, tmp_path):
    foreign = tmp_path / "resnet.pth"
    other_architecture(foreign)
    for flags in (("--pretrained", str(foreign)), ("--eval", "--pretrained", str(foreign))):
        with pytest.raises(UsageError, match=r"--pretrained .*resnet.pth: only 0 of this model's 101 tensors find a "
                                             r"match in it"):
            main(demo_args(demo_data, tmp_path / "out", *flags))
    main(demo_args(demo_data, tmp_path / "trained"))
    weights = load(run_dir(tmp_path / "trained") / "ckpt_epoch_0.pth")["model"]

    # Another architecture that shares only its stem and first stage: most tensors would stay at random values.
    stem = {name: value for name, value in weights.items() if name.startswith(("patch_embed.", "layers.0."))}
    torch.save({"model": stem}, tmp_path / "stem.pth")
    with pytest.raises(UsageError, match=rf"--pretrained .*stem.pth: only {len(stem)} of this model's 101 tensors find "
                                         r"a match in it .* lower MODEL.PRETRAINED_MIN_LOADED \(now 0.5\)$"):
        main(demo_args(demo_data, tmp_path / "out", "--pretrained", str(tmp_path / "stem.pth")))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    main(demo_args(demo_data, tmp_path / "forced", "--pretrained", str(tmp_path / "stem.pth"),
                   opts=("MODEL.PRETRAINED_MIN_LOADED", "0.2")))
    assert re.search(rf"pretrained .*stem.pth: {len(stem)} of its {len(stem)} tensors loaded; 0 resized; 0 derived from "
                     rf"its tables; {101 - len(stem)} left at initial values: ", read_log(tmp_path / "forced"))

    weights["head.weight"], weights["head.bias"] = weights["head.weight"][:7], weights["head.bias"][:7]
    torch.save({"model": weights}, tmp_path / "seven_classes.pth")
    with pytest.raises(UsageError, match=r"--eval --pretrained .*seven_classes.pth: it leaves part of the model at "
                                         r"random initial values \(missing 2 keys: head.weight, head.bias\)"):
        main(demo_args(demo_data, tmp_path / "out", "--eval", "--pretrained", str(tmp_path / "seven_classes.pth")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_ends_a_process_waiting_for_missing_ranks_at_once(demo_data, tmp_path, stop):
    env = {**MAIN_ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "main.py", *demo_args(demo_data, tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The line is printed just before the wait starts, with the handlers long installed: the signal can come now.
    wait_for_line(proc, "waiting for 2 processes at 127.0.0.1")
    proc.send_signal(stop)
    # Ending within the timeout means the wait was interrupted: the rendezvous alone would block for 30 minutes.
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + stop
    reason = "interrupted (Ctrl-C)" if stop == signal.SIGINT else "terminated by SIGTERM"
    assert stderr.strip().startswith(f"stopped: {reason}") and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("stop, reason, workers", [
    # what torchrun sends the surviving ranks, to the process alone (not under torchrun: no word of other ranks)
    (signal.SIGTERM, "terminated by SIGTERM", "0"),
    # a terminal's Ctrl-C, to the whole foreground process group: main.py and its DataLoader workers
    (signal.SIGINT, "interrupted (Ctrl-C)", "2"),
], ids=["sigterm", "ctrl-c"])
@pytest.mark.slow
def test_a_signal_during_training_is_one_log_line_no_traceback_and_whole_checkpoints(demo_data, tmp_path, stop,
                                                                                    reason, workers):
    """The process exits through Python with 128 + the signal, says why exactly once (the signal handler logs it,
    wherever the exception then surfaces), prints no traceback and leaves only complete checkpoints."""
    args = demo_args(demo_data, tmp_path, opts=("TRAIN.EPOCHS", "50", "SAVE_FREQ", "1", "DATA.NUM_WORKERS", workers))
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=MAIN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_line(proc, "Train: [1/50][1/")  # epoch 0 is saved
    if stop == signal.SIGINT:
        os.killpg(proc.pid, stop)
    else:
        proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + stop
    assert "Traceback" not in stdout + stderr and stderr.strip() == "", stderr
    log = read_log(tmp_path)
    assert log.count(f"stopped: {reason}\n") == 1 and "ERROR failed" not in log
    files = sorted(p.name for p in run_dir(tmp_path).iterdir())
    assert "ckpt_epoch_0.pth" in files and not any(name.endswith(".tmp") for name in files)
    for name in files:
        if name.startswith("ckpt_epoch_"):
            assert load(run_dir(tmp_path) / name)["epoch"] == int(name[len("ckpt_epoch_"):-4])


def test_distributed_environment_without_a_master_address_is_named(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match=r"WORLD_SIZE=2 asks for a distributed run, but MASTER_ADDR and MASTER_PORT "
                                         r"are not set: start it with torchrun"):
        main(demo_args(demo_data, tmp_path))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_files_that_are_not_what_they_claim_give_one_line(data, tmp_path, entry_points):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\n" * 20)
    one_line_error(entry_points.main(demo_args(data, tmp_path / "a", "--resume", str(text))),
                   f"cannot read checkpoint {text}: it is not a PyTorch checkpoint")
    (data / "val.zip").write_bytes(b"this is no zip archive")
    one_line_error(entry_points.main(demo_args(data, tmp_path / "b", "--zip")), f"cannot read {data / 'val.zip'}")
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    one_line_error(entry_points.main(demo_args(data, blocker)), "--output: cannot write to", "Not a directory")
    export = entry_points.run(["-m", "tools.export", "--cfg", DEMO_CFG, "--checkpoint", str(text), "--output",
                               str(blocker / "model.pt2")])
    assert export.returncode == 1 and len(export.stderr.strip().splitlines()) == 1, export.stderr
    assert "--output: cannot write to" in export.stderr


def test_a_corrupt_image_with_a_non_utf8_name_is_named_in_the_log(data, tmp_path, entry_points):
    bad = os.path.join(os.fsencode(data / "val" / "circle"), b"broken-\xff.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    before_output = tmp_path / "out"
    proc = entry_points.main(demo_args(data, before_output, opts=("DATA.NUM_WORKERS", "1")))
    line = one_line_error(proc, "cannot read image", "broken-")
    assert "Logging error" not in proc.stdout + proc.stderr
    assert "stopped: cannot read image" in read_log(before_output) and "broken-\\udcff.png" in line + read_log(
        before_output)
    assert not (run_dir(before_output) / "config.yaml").exists()  # found before the run wrote its config


def test_images_over_the_pixel_limit_are_skipped_when_asked(data, tmp_path, monkeypatch):
    big = first_image(data, "val")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(big, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 32x32 images pass, 64x64 is over twice the limit
    main(demo_args(data, tmp_path, opts=("DATA.SKIP_BAD_IMAGES", "True")))
    log = read_log(tmp_path)
    assert f"skipping unreadable image {big}" in log and "1 unreadable validation images were skipped" in log
    assert eval_summary(log)["counted"] == eval_summary(log)["images"] == 19  # the count says 19, not 20


def test_a_zip_validation_set_without_the_last_class_is_accepted(data, tmp_path):
    lines = (data / "val_map.txt").read_text().splitlines()
    top = max(int(line.split("\t")[1]) for line in lines)
    (data / "val_map.txt").write_text("".join(f"{l}\n" for l in lines if int(l.split("\t")[1]) != top))
    main(demo_args(data, tmp_path, "--zip"))
    assert eval_summary(read_log(tmp_path))["images"] == 18


def test_a_symlink_loop_in_a_class_folder_adds_no_images(data, tmp_path):
    os.symlink(".", data / "train" / "circle" / "again")
    main(demo_args(data, tmp_path))
    assert "Train: [0/1][4/5]" in read_log(tmp_path)  # 40 images in batches of 8, as without the link


def test_hidden_files_and_folders_are_neither_images_nor_classes(data, tmp_path):
    """A dataset copied from macOS holds a ``._<name>`` AppleDouble file (metadata, not an image) beside each image,
    and Jupyter leaves ``.ipynb_checkpoints`` folders: the first stopped training as an unreadable image (in the
    validation set only after an epoch of training), the second was refused as an empty class."""
    for split, folder in (("train", "circle"), ("val", "square")):
        (data / split / folder / "._img.JPEG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
        (data / split / ".ipynb_checkpoints").mkdir()
    main(demo_args(data, tmp_path))
    log = read_log(tmp_path)
    assert "Train: [0/1][4/5]" in log and eval_summary(log)["images"] == 20


def test_16_bit_images_keep_their_tones():
    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.5)  # 16 bits to 8: rounded, half a level at most
    assert np.asarray(Image.fromarray(ramp).convert("RGB")).mean() > 250  # what plain conversion makes of it
