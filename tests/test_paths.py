"""Paths that cannot be used are refused in one line where they enter, before any work: a config key or a tool's
flag naming a FIFO, a socket (or a path below one), and a demo asked to write where nothing can be written."""
import contextlib
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from config import UsageError, get_config
from data import demo as data_demo
from dense import demo as dense_demo
from detection.config import DETECTION_RULES, detection_defaults
import predict
from segmentation.config import SEGMENTATION_RULES, segmentation_defaults
from tests.helpers import REPO
from tools import bench_dense, benchmark, export

FLAGS = {"DATA.DATA_PATH": "--data-path", "MODEL.PRETRAINED": "--pretrained", "MODEL.RESUME": "--resume",
         "OUTPUT": "--output"}


def special_file(folder: Path, kind: str, suffix: str = "") -> Path:
    """A FIFO or a bound Unix socket in ``folder``, its name ending in ``suffix``; ``below-<kind>``: a path inside
    one."""
    path = folder / (kind.replace("below-", "") + suffix)
    if path.stem == "fifo":
        os.mkfifo(path)
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    return path / f"run{suffix}" if kind.startswith("below") else path


KINDS = ["fifo", "socket", "below-fifo"]


def refusal(build) -> str:
    with pytest.raises((UsageError, ValueError)) as refused:
        build()
    return str(refused.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", list(FLAGS))
def test_a_path_key_that_is_no_file_or_folder_is_refused_by_each_task_naming_it(key, kind, tmp_path):
    """Today a FIFO --resume or --pretrained was 'not found' after the model was built, a FIFO --output was
    written under; each is now refused with the config, for classification and both dense tasks."""
    path = str(special_file(tmp_path, kind))
    opts = [key, path] + (["DATA.DATA_PATH", str(tmp_path)] if key != "DATA.DATA_PATH" else [])
    builds = {
        "classification": lambda: get_config(SimpleNamespace(cfg=str(REPO / "configs/demo/focal_demo.yaml"),
                                                             opts=opts)),
        "detection": lambda: get_config(SimpleNamespace(cfg=str(REPO / "configs/detection/demo.yaml"),
                                                             opts=opts), detection_defaults(), DETECTION_RULES),
        "segmentation": lambda: get_config(SimpleNamespace(cfg=str(REPO / "configs/segmentation/demo.yaml"),
                                                                opts=opts), segmentation_defaults(),
                                                SEGMENTATION_RULES),
    }
    for task, build in builds.items():
        message = refusal(build)
        assert f"{FLAGS[key]} ({key}) must be a file or a folder, not a FIFO, socket or device" in message, task
        assert "\n" not in message


def test_paths_that_are_files_folders_or_missing_pass_the_config(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"")
    config = get_config(SimpleNamespace(cfg=str(REPO / "configs/demo/focal_demo.yaml"), opts=[
        "DATA.DATA_PATH", str(tmp_path), "MODEL.PRETRAINED", str(tmp_path / "weights.pth"),
        "OUTPUT", str(tmp_path / "not" / "yet")]))
    assert config.OUTPUT.startswith(str(tmp_path / "not" / "yet"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("parse, argv, flag, suffix", [
    (export.parse_args, ["--cfg", "c.yaml", "--output", "m.pt2", "--checkpoint"], "--checkpoint", ".pth"),
    (export.parse_args, ["--cfg", "c.yaml", "--checkpoint", "w.pth", "--output"], "--output", ".onnx"),
    (benchmark.parse_args, ["--json"], "--json", ".json"),
    (benchmark.parse_args, ["--plot"], "--plot", ".png"),
    (bench_dense.parse_args, ["--json"], "--json", ".json"),
    (predict.parse_args, ["--cfg", "c.yaml", "--checkpoint"], "--checkpoint", ".pth"),
], ids=["export-checkpoint", "export-output", "benchmark-json", "benchmark-plot", "bench_dense-json",
        "predict-checkpoint"])
def test_a_tool_path_flag_that_is_no_file_or_folder_is_refused_naming_the_flag(parse, argv, flag, suffix, kind,
                                                                               tmp_path, capsys):
    """Opening a FIFO to write the figures waited forever after minutes of timing."""
    with pytest.raises(SystemExit) as stop:
        parse([*argv, str(special_file(tmp_path, kind, suffix))])
    assert stop.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """``folder``, where no file can be made: its mode for a user, a read-only mount for root (who ignores
    modes), skipped where neither is possible."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root without a read-only mount cannot make a folder it cannot write")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("main, argv", [
    (data_demo.main, ["--classes", "1", "--train-per-class", "1", "--val-per-class", "1"]),
    (dense_demo.main, ["--task", "detection", "--train", "1", "--val", "1"]),
    (dense_demo.main, ["--task", "segmentation", "--train", "1", "--val", "1"]),
], ids=["data.demo", "dense.demo-detection", "dense.demo-segmentation"])
@pytest.mark.parametrize("below", [False, True], ids=["folder", "subfolder"])
def test_a_demo_on_a_folder_it_cannot_write_says_so_in_one_line(main, argv, below, tmp_path, capsys):
    """Today a traceback (Read-only file system, or Permission denied) from the first image written."""
    with read_only_folder(tmp_path / "ro") as folder:
        out = folder / "demo" if below else folder
        with pytest.raises(SystemExit) as stop:
            main(["--out", str(out), *argv])
        reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
        assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(
            f"demo: error: --out: cannot write to {out}: {reason}")
        assert not any(folder.iterdir())
