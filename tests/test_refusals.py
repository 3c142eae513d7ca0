"""Hostile but realistic input, round three: weights or losses that are not finite, names that would write
outside --output, starts refused for bad input that must leave nothing behind, and the tools' one-line errors.
Each test here failed on the code before the fix it guards."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from config import TrainingError, UsageError
from main import main
from segmentation.data import SegmentationFolder, read_labels

from tests.helpers import (REPO, assert_intact, demo_args, eval_summary, first_image, load, poisoned_copy, read_log,
                           run_dir)

CHECKPOINT = "ckpt_epoch_0.pth"


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_evaluating_or_fine_tuning_from_nan_weights_is_refused_by_tensor_name(flag, previous_run, demo_data,
                                                                              tmp_path):
    bad = poisoned_copy(run_dir(previous_run) / CHECKPOINT, tmp_path / "nan.pth")
    for mode in (("--eval",), ()):
        with pytest.raises(UsageError, match=r"checkpoint .*nan.pth holds non-finite values \(NaN or infinity\) in "
                                             r"model.layers.1.blocks.0.attn.qkv.weight"):
            main(demo_args(demo_data, tmp_path / "out", *mode, flag, str(bad)))
    assert not (tmp_path / "out").exists()


def test_predict_and_export_refuse_nan_weights(previous_run, tmp_path):
    from predict import load_model
    from tools.export import export, parse_args
    bad = poisoned_copy(run_dir(previous_run) / CHECKPOINT, tmp_path / "nan.pth")
    cfg = str(REPO / "configs" / "demo" / "focal_demo.yaml")
    with pytest.raises(UsageError, match=r"--checkpoint .*nan.pth: checkpoint .* holds non-finite values"):
        load_model(cfg, [], str(bad), torch.device("cpu"))
    with pytest.raises(UsageError, match=r"non-finite values"):
        export(parse_args(["--cfg", cfg, "--checkpoint", str(bad), "--output", str(tmp_path / "m.pt2")]))
    assert not (tmp_path / "m.pt2").exists()


def test_an_export_whose_check_compares_nan_writes_nothing(previous_run, tmp_path, monkeypatch):
    import tools.export as export_tool
    monkeypatch.setattr(export_tool, "max_difference", lambda *args: float("nan"))
    cfg = str(REPO / "configs" / "demo" / "focal_demo.yaml")
    args = ["--cfg", cfg, "--opts", "DATA.IMG_SIZE", "32", "--checkpoint", str(run_dir(previous_run) / CHECKPOINT),
            "--output", str(tmp_path / "m.pt2")]
    with pytest.raises(UsageError, match=r"differs from the model by nan .*nothing written"):
        export_tool.export(export_tool.parse_args(args))
    assert not (tmp_path / "m.pt2").exists()


def test_a_nan_validation_loss_stops_the_run_and_is_never_the_best(demo_data, tmp_path):
    # One update per epoch at a rate of 1e7 (scaled by 40/512): the weights overflow without a NaN training loss.
    opts = ("TRAIN.EPOCHS", "2", "DATA.BATCH_SIZE", "40", "TRAIN.BASE_LR", "1e7", "TRAIN.CLIP_GRAD", "0",
            "TRAIN.WEIGHT_DECAY", "0.0")
    with pytest.raises(TrainingError, match=r"the validation loss of the network is nan after epoch 0: stopping. No "
                                            r"checkpoint was saved yet; start again with a lower TRAIN.BASE_LR"):
        main(demo_args(demo_data, tmp_path, opts=opts))
    assert not list(run_dir(tmp_path).glob("*.pth"))
    assert "Max accuracy" not in read_log(tmp_path)


def test_a_warm_up_as_long_as_the_run_is_refused_naming_both_keys(demo_data, tmp_path):
    with pytest.raises(UsageError, match=r"TRAIN.WARMUP_EPOCHS must be below TRAIN.EPOCHS: .*got 1"):
        main(demo_args(demo_data, tmp_path, opts=("TRAIN.WARMUP_EPOCHS", "1")))
    assert not tmp_path.joinpath("focal_demo_patch4_window4_64").exists()


def test_timm_s_scheduler_warning_lands_in_the_run_s_log(demo_data, tmp_path, capfd):
    # One update in all: timm's cosine schedule has nothing to anneal and says so through its logger.
    main(demo_args(demo_data, tmp_path, opts=("DATA.BATCH_SIZE", "40")))
    assert "timm.scheduler.cosine_lr" in read_log(tmp_path) and "Cosine annealing scheduler will have no effect" \
        in read_log(tmp_path)
    assert "Cosine annealing" not in capfd.readouterr().err
    assert logging.getLogger("timm").handlers  # routed to the run's handlers, not Python's last-resort stderr


@pytest.mark.parametrize("flags, key", [
    (("--tag", "../../../escaped"), r"--tag \(TAG\)"),
    (("--tag", ".."), r"--tag \(TAG\)"),
    ((), r"MODEL.NAME"),
])
def test_names_that_leave_the_output_folder_are_refused(flags, key, demo_data, tmp_path):
    opts = ("MODEL.NAME", "../outside") if not flags else ()
    output = tmp_path / "a" / "b" / "out"
    with pytest.raises(UsageError, match=key + r" must be one folder name"):
        main(demo_args(demo_data, output, *flags, opts=opts))
    assert list(tmp_path.rglob("*")) == []


def test_an_empty_config_file_is_refused_naming_it(demo_data, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    args = demo_args(demo_data, tmp_path / "out")
    args[args.index("--cfg") + 1] = str(empty)
    with pytest.raises(UsageError, match=rf"config file {empty} is empty: it sets no key"):
        main(args)


def test_resume_and_pretrained_together_are_refused(previous_run, demo_data, tmp_path):
    weights = str(run_dir(previous_run) / CHECKPOINT)
    with pytest.raises(UsageError, match=r"--resume \(MODEL.RESUME\) cannot be combined with --pretrained"):
        main(demo_args(demo_data, tmp_path, "--resume", weights, "--pretrained", weights))


def test_auto_resume_says_that_pretrained_weights_are_not_loaded(copy_of, data):
    output, _ = copy_of
    weights = str(run_dir(output) / CHECKPOINT)
    main(demo_args(data, output, "--pretrained", weights, opts=("TRAIN.EPOCHS", "2")))
    assert f"--pretrained {weights} is not loaded: the run continues from its own checkpoint" in read_log(output)


def relabel(map_file: Path, line: int, label: int) -> None:
    lines = map_file.read_text().splitlines()
    path = lines[line - 1].split("\t")[0]
    lines[line - 1] = f"{path}\t{label}"
    map_file.write_text("\n".join(lines) + "\n")


def test_a_typo_d_zip_label_is_named_by_line_instead_of_asking_for_more_classes(data, tmp_path):
    relabel(data / "train_map.txt", 3, 57)
    with pytest.raises(UsageError, match=r"train_map.txt:3: label 57 lies far above the others \(labels 0-9 are "
                                         r"used, then none up to 57\); a typo\? Fix that line; if the labels are "
                                         r"right, set MODEL.NUM_CLASSES 58 \(now 10\)"):
        main(demo_args(data, tmp_path, "--zip"))


def test_a_zip_validation_label_the_training_map_never_uses_is_named(data, tmp_path):
    # Class 4 has no training image (its lines relabelled 9): the 10 configured classes still fit the data.
    train_map = data / "train_map.txt"
    train_map.write_text("".join(line if not line.endswith("\t4\n") else line.replace("\t4\n", "\t9\n")
                                 for line in train_map.read_text().splitlines(keepends=True)))
    val_line = next(n for n, line in enumerate((data / "val_map.txt").read_text().splitlines(), 1)
                    if line.endswith("\t4"))
    with pytest.raises(UsageError, match=rf"val_map.txt:{val_line}: label 4 is used by no image of .*train_map.txt"):
        main(demo_args(data, tmp_path, "--zip"))


def test_a_map_file_saved_with_a_bom_or_in_latin_1_is_read_or_named_by_line(data, tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: it became part of the first path, and the run was
    refused saying an image that is in the zip is not (the mark does not print). A map file in another encoding
    stopped the run with a UnicodeDecodeError traceback instead of naming the file and line."""
    val_map = data / "val_map.txt"
    val_map.write_bytes(b"\xef\xbb\xbf" + val_map.read_bytes())
    main(demo_args(data, tmp_path / "bom", "--zip"))
    assert eval_summary(read_log(tmp_path / "bom"))["images"] == 20
    with (data / "train_map.txt").open("ab") as f:
        f.write(b"caf\xe9/x.jpg\t0\n")
    lines = len((data / "train_map.txt").read_bytes().splitlines())
    with pytest.raises(UsageError, match=rf"train_map.txt:{lines}: not UTF-8 text"):
        main(demo_args(data, tmp_path / "latin", "--zip"))


@pytest.mark.parametrize("case, flags, opts", [
    ("bad model key", (), ("MODEL.FOCAL.WINDOW_SIZE", "0")),
    ("data layout", (), ()),
    ("eval without weights", ("--eval",), ("TRAIN.AUTO_RESUME", "False")),
    ("fp16 on CPU", ("--amp", "fp16", "--device", "cpu"), ()),
    # the folders above the tag were made before the tag's failed (File name too long) and stayed behind
    ("tag longer than a file name", ("--tag", "x" * 300), ()),
])
def test_a_start_refused_for_bad_input_leaves_nothing_behind(case, flags, opts, data, tmp_path):
    if case == "data layout":
        shutil.rmtree(data / "val")
    output = tmp_path / "new" / "runs"
    with pytest.raises(Exception, match=r".") as info:
        main(demo_args(data, output, *flags, opts=opts))
    assert info.type.__name__ in ("UsageError", "ConfigError")
    assert not (tmp_path / "new").exists()


def test_a_refused_start_in_an_existing_run_folder_appends_its_reason_and_removes_nothing(copy_of, data):
    output, before = copy_of
    with pytest.raises(UsageError, match=r"--amp fp16 needs a CUDA device"):
        main(demo_args(data, output, "--amp", "fp16", "--device", "cpu"))
    assert_intact(output, before)
    assert read_log(output).rstrip().endswith("stopped: --amp fp16 needs a CUDA device; on CPU use --amp bf16 or "
                                              "--amp none")


@pytest.mark.parametrize("explicit", [False, True])
def test_resuming_on_other_class_folders_is_refused_naming_the_first_that_differs(explicit, copy_of, data):
    """Labels are the sorted class-folder names. Resuming a run whose folders were renamed (or auto-resuming in an
    output folder trained on another dataset with as many classes) went on training silently with every label
    from the first difference on meaning another class than the checkpoint's output of that index."""
    output, before = copy_of
    for split in ("train", "val"):
        (data / split / "circle").rename(data / split / "zz_circle")
    flags = ("--resume", str(run_dir(output) / CHECKPOINT)) if explicit else ()
    hint = (r"--pretrained .*ckpt_epoch_0.pth starts from its weights" if explicit else
            r"Start a new run under another --tag or --output \(--pretrained .*ckpt_epoch_0.pth there starts from "
            r"its weights\)")
    with pytest.raises(UsageError, match=rf"ckpt_epoch_0.pth.*: it was trained on other class folders than "
                                         rf".*data/train holds: output 1 is 'circle' there and 'cross' here; "
                                         rf"resuming would train its outputs on other classes. {hint}"):
        main(demo_args(data, output, *flags, opts=("TRAIN.EPOCHS", "2")))
    assert_intact(output, before)


def test_an_unreadable_validation_image_keeps_the_epoch_it_follows(data, tmp_path):
    bad = first_image(data, "val")
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    args = demo_args(data, tmp_path, opts=("TRAIN.EPOCHS", "2"))
    with pytest.raises(UsageError, match=rf"cannot read image {bad}: .*Epoch 0's training is saved in "
                                         r".*ckpt_epoch_0.pth: once the image is fixed, the same command resumes"):
        main(args)
    saved = load(run_dir(tmp_path) / CHECKPOINT)
    assert saved["epoch"] == 0 and saved["max_accuracy"] <= 0  # not evaluated: no score yet
    bad.write_bytes(good)
    main(args)
    log = read_log(tmp_path)
    assert "auto-resuming from" in log and log.count("Train: [0/2][0/") == 1 and "Train: [1/2][0/" in log
    assert eval_summary(log)["images"] == 20


def test_an_unknown_compile_backend_is_refused_up_front(demo_data, tmp_path):
    with pytest.raises(UsageError, match=r"--compile \(COMPILE\) must name a torch.compile backend .*got 'nosuch'"):
        main(demo_args(demo_data, tmp_path, "--compile", "nosuch"))
    assert not any(tmp_path.iterdir())


def test_an_unknown_key_is_named_without_doubled_quotes(demo_data, tmp_path):
    with pytest.raises(UsageError) as info:
        main(demo_args(demo_data, tmp_path, opts=("TRAIN.EPOCH", "3")))
    assert str(info.value).endswith("): Non-existent key: TRAIN.EPOCH")


def ade_layout(root: Path) -> Path:
    from PIL import Image
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 90, 30, 60)).save(root / "images" / split / f"{index}.jpg")
            Image.new("L", (8, 8), index + 1).save(root / "annotations" / split / f"{index}.png")
    return root


@pytest.mark.parametrize("damaged", ["images/training/1.jpg", "annotations/training/1.png"])
def test_segmentation_names_a_corrupt_image_or_annotation_in_one_line(damaged, tmp_path):
    from segmentation.config import segmentation_defaults
    root = ade_layout(tmp_path / "ade")
    (root / damaged).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UsageError, match=rf"^cannot read (image|annotation) {root / damaged}: "):
        SegmentationFolder(str(root), "train", segmentation_defaults(), train=True)
    if damaged.endswith(".png"):
        with pytest.raises(UsageError, match=rf"^cannot read annotation {root / damaged}: "):
            read_labels(str(root / damaged))


@pytest.mark.parametrize("flags, message", [
    (["--models", "timm:nosuch"], r"timm has no model 'nosuch'"),
    (["--device", "cuda:0"], r"--device cuda:0: no CUDA device is available here"),
    (["--json", "/nonexistent-folder/figures.json"], r"--json .*figures.json: cannot write there"),
    (["--models", "configs/demo/focal_demo.yaml", "--img-size", "64", "30"], r"--img-size 30: .*DATA.IMG_SIZE"),
    (["--plot", "throughput"], r"--plot throughput: Pillow cannot write this file type"),  # once after timing
])
def test_the_benchmark_refuses_bad_flags_before_timing_anything(flags, message, monkeypatch):
    from tools import benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(benchmark, "run_speed", lambda *args: pytest.fail("timed before checking its flags"))
    with pytest.raises(SystemExit, match=message):
        benchmark.main(flags)


def test_a_dataloader_worker_leaves_ctrl_c_to_the_main_process(monkeypatch):
    """A terminal's Ctrl-C reaches every worker too; one still starting up used to raise KeyboardInterrupt outside
    the DataLoader's loop and print a traceback (the flaky Ctrl-C test): workers now let the main process stop."""
    import signal

    import logger as run_logger
    monkeypatch.setattr(run_logger, "MAIN_PID", -1)  # as seen from a forked worker
    assert run_logger.exit_on_signal(signal.SIGINT, None) is None


@pytest.mark.parametrize("torchrun, expected", [(False, "stopped: terminated by SIGTERM"),
                                                (True, "stopped: terminated by SIGTERM (torchrun stops all ranks")])
def test_sigterm_mentions_torchrun_only_under_torchrun(torchrun, expected, monkeypatch, caplog):
    import os
    import signal

    import logger as run_logger
    monkeypatch.setattr(run_logger, "MAIN_PID", os.getpid())
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with caplog.at_level(logging.ERROR, logger="focal"), pytest.raises(run_logger.Terminated):
        run_logger.exit_on_signal(signal.SIGTERM, None)
    assert caplog.messages[-1].startswith(expected) and (torchrun or "torchrun" not in caplog.messages[-1])


class FlushInterruptedByStop:
    """A log file whose next flush is interrupted by Ctrl-C, as a signal landing inside the buffered writer's flush
    does: the handler runs there, and a buffered writer refuses to be entered again while it flushes."""

    def __init__(self, stream) -> None:
        self.stream, self.flushing, self.armed = stream, False, True

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        import signal

        import logger as run_logger
        if self.flushing:
            raise RuntimeError("reentrant call inside <_io.BufferedWriter>")
        self.flushing = True
        try:
            if self.armed:
                self.armed = False
                run_logger.exit_on_signal(signal.SIGINT, None)
            self.stream.flush()
        finally:
            self.flushing = False

    def close(self) -> None:
        self.stream.close()


def test_a_stop_landing_while_the_log_file_flushes_is_logged_after_the_interrupted_line(tmp_path, monkeypatch,
                                                                                        capsys):
    """CI caught the stop line printed as a "--- Logging error ---" traceback: Ctrl-C landed while the log file
    flushed an evaluation line, and the stop line re-entered that flush."""
    import os

    import logger as run_logger
    from logger import create_logger
    monkeypatch.setattr(run_logger, "MAIN_PID", os.getpid())
    logger = create_logger(str(tmp_path), rank=1)
    (log_file,) = logger.handlers
    log_file.setStream(FlushInterruptedByStop(log_file.stream))
    with pytest.raises(run_logger.Terminated):
        logger.info("Test: [3/50]")
    logger.info("clean-up line")
    log_file.close()
    lines = (tmp_path / "log_rank1.txt").read_text().splitlines()
    assert [line.split(": INFO ")[-1].split(": ERROR ")[-1] for line in lines] == [
        "Test: [3/50]", "stopped: interrupted (Ctrl-C)", "clean-up line"]
    assert "Logging error" not in capsys.readouterr().err


def test_broken_pipes_of_a_stopped_main_process_stay_out_of_a_worker_s_stderr(capsys, monkeypatch):
    import sys

    from logger import quiet_worker_teardown
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    quiet_worker_teardown(0)
    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "Connection reset by peer")):
        sys.excepthook(type(error), error, None)
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real problem"), None)
    assert "a real problem" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_to_main_py_alone_during_an_evaluation_with_workers_prints_no_traceback(previous_run, demo_data,
                                                                                       tmp_path):
    """SIGINT to the main process only (not its workers), while workers hand over batches: before the fix 3 of 12
    tries printed a worker's broken-pipe traceback; three tries here."""
    import signal

    from tests.helpers import start_main, wait_for_line
    output = tmp_path / "out"
    shutil.copytree(previous_run, output)
    for _ in range(3):
        proc = start_main(demo_args(demo_data, output, "--eval", opts=("DATA.NUM_WORKERS", "2", "DATA.BATCH_SIZE",
                                                                           "2")))
        wait_for_line(proc, "Test: [0/")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT
        assert "Traceback" not in stdout + stderr, stderr


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["main.py", "detection.train"])
def test_a_usage_error_reaches_the_console_once(entry, tmp_path, entry_points):
    """The entry point's one line on stderr; the log file keeps its 'stopped:' copy (it printed on stdout too)."""
    missing = tmp_path / "nowhere"
    if entry == "main.py":
        done = entry_points.main(["--cfg", str(REPO / "configs" / "demo" / "focal_demo.yaml"), "--data-path",
                                  str(missing), "--output", str(tmp_path / "out")])
    else:
        done = entry_points.run(["-m", "detection.train", "--cfg", str(REPO / "configs" / "detection" / "demo.yaml"),
                                 "--data-path", str(missing), "--output", str(tmp_path / "out"), "--device", "cpu"])
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1 and sum(str(missing) in line for line in lines) == 1, lines
    assert done.stderr.strip().splitlines()[-1].startswith(f"{'main.py' if entry == 'main.py' else 'detection.train'}")


def test_eval_with_model_ema_on_weights_without_an_average_says_so(previous_run, demo_data, tmp_path):
    """--eval --model-ema on a checkpoint trained without EMA evaluated the model alone without a word."""
    checkpoint = run_dir(previous_run) / CHECKPOINT
    main(demo_args(demo_data, tmp_path, "--eval", "--model-ema", "--resume", str(checkpoint)))
    log = read_log(tmp_path)
    assert f"--model-ema (MODEL_EMA): --resume {checkpoint} holds no EMA weights; only the model is evaluated" in log
    assert "Accuracy of the network" in log and "Accuracy of the EMA model" not in log
