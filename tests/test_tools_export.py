"""tools/export.py: a checkpoint becomes a .pt2 or .onnx file that computes what the eager model computes."""
import subprocess
import sys

import pytest
import torch

from config import load_config
from errors import UsageError
from models import build_model
from tests.helpers import REPO, randomise
from tools import export as export_tool

CFG = "configs/demo/focal_demo.yaml"


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(build_model(load_config(str(REPO / CFG))), std=0.05).eval()
    path = tmp_path_factory.mktemp("ckpt") / "demo.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, path


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "tools.export", "--cfg", CFG, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pt2_with_dynamic_batch_equals_eager(model_and_checkpoint, tmp_path):
    model, ckpt = model_and_checkpoint
    out = tmp_path / "demo.pt2"
    done = run_export("--checkpoint", ckpt, "--output", out, "--dynamic-batch")
    assert done.returncode == 0, done.stderr
    assert "max |difference| from the eager model" in done.stdout
    program = torch.export.load(str(out))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_at_another_size_with_dynamic_batch_equals_eager(model_and_checkpoint, tmp_path):
    """The project's one ONNX export (the v1 demo model, through the tool), run by onnxruntime at two batch sizes.
    onnx, onnxscript and onnxruntime are part of CI (requirements-dev.txt): a missing one fails here."""
    import onnxruntime
    model, ckpt = model_and_checkpoint
    out = tmp_path / "demo.onnx"
    done = run_export("--checkpoint", ckpt, "--output", out, "--img-size", 48, 80, "--dynamic-batch")
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 48, 80, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--output", "{tmp}/m.tflite"], "--output"),
    (["--output", "{tmp}/m.pt2", "--img-size", "1", "2", "3"], "--img-size"),
])
def test_bad_flags_are_refused_by_name(model_and_checkpoint, tmp_path, capsys, args, message):
    """argparse's usage error (exit status 2) naming the flag, in process (test_reliability runs the tool as a
    process for its one-line errors)."""
    _, ckpt = model_and_checkpoint
    with pytest.raises(SystemExit) as stop:
        export_tool.parse_args(["--cfg", CFG, "--checkpoint", str(ckpt), *[a.format(tmp=tmp_path) for a in args]])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unreadable_checkpoint_is_named_and_nothing_is_written(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    args = export_tool.parse_args(["--cfg", CFG, "--checkpoint", str(bad), "--output", str(tmp_path / "m.pt2")])
    with pytest.raises(UsageError, match=f"--checkpoint {bad}"):
        export_tool.export(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_failed_check_writes_nothing(model_and_checkpoint, tmp_path, monkeypatch, suffix):
    _, ckpt = model_and_checkpoint
    out = tmp_path / f"demo{suffix}"
    args = export_tool.parse_args(["--cfg", str(REPO / CFG), "--checkpoint", str(ckpt), "--output", str(out)])
    monkeypatch.setattr(export_tool, "TOLERANCE", -1.0)  # no difference passes
    failing_check = "the exported program differs"
    if suffix == ".onnx":  # the program passes; the ONNX file is written, run by onnxruntime and fails its check
        monkeypatch.setattr(export_tool, "max_difference", lambda *a: -2.0)
        failing_check = "onnxruntime's output differs"
    with pytest.raises(UsageError, match=f"{failing_check} .*nothing written"):
        export_tool.export(args)
    assert not any(tmp_path.iterdir())
