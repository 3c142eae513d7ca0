"""tools/export.py: a checkpoint becomes a .pt2 or .onnx file that computes what the eager model computes, named
and described for a user feeding it (the batch axis, the preprocessing), with a progress line per stage."""
import json
import re
from pathlib import Path
from typing import Tuple

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import UsageError, load_config
from models import build_model
from tests.helpers import REPO, assert_agree, longest_sum, randomise, roundoff
from tools import export as export_tool

CFG = "configs/demo/focal_demo.yaml"
V2_CFG = "configs/demo/focalv2_demo.yaml"
# The demo models cut to their first two stages, the second with the one-token pooling window of the later ones:
# every operation of the four stages, in less than half the graph that an ONNX conversion's time grows with.
TWO_STAGES = ["MODEL.FOCAL.DEPTHS", "[1, 1]", "MODEL.FOCAL.NUM_HEADS", "[1, 2]", "MODEL.FOCAL.FOCAL_STAGES", "[0, 1]",
              "MODEL.FOCAL.FOCAL_LEVELS", "[2, 2]", "MODEL.FOCAL.FOCAL_WINDOWS", "[3, 1]",
              "MODEL.FOCAL.EXPAND_SIZES", "[2, 2]", "MODEL.FOCAL.EXPAND_STAGES", "[0, 1]"]


def write_checkpoint(cfg: str, folder: Path) -> Tuple[torch.nn.Module, Path]:
    """A two-stage demo model with seeded random weights, and its checkpoint in ``folder``."""
    torch.manual_seed(0)
    model = randomise(build_model(load_config(str(REPO / cfg), TWO_STAGES)), std=0.05).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, path


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    return write_checkpoint(CFG, tmp_path_factory.mktemp("ckpt"))


def run_export(capsys, *args) -> str:
    """The tool in this process (test_reliability runs it as a process for its one-line errors); what it printed."""
    export_tool.export(export_tool.parse_args(["--cfg", CFG, "--opts", *TWO_STAGES, *map(str, args)]))
    return capsys.readouterr().out


def preprocessing(shape, interpolation="bicubic", crop_pct=224 / 256, crop_mode="center"):
    """What the tool must record: timm's ImageNet normalisation (the evaluation transform's), the config's
    interpolation, and the centre crop of 224 in 256 (``TEST.CROP``) or a squash to size (without it)."""
    return {"input_shape": shape, "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
            "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}


def stage_lines(out: str, *stages: str) -> None:
    """A line as each stage starts, the second on with the time left."""
    for k, stage in enumerate(stages, 1):
        eta = r", eta \d+:\d\d:\d\d" if k > 1 else ""
        assert re.search(rf"^\[{k}/{len(stages)}\] {stage}{eta}$", out, re.M), (stage, out)


@pytest.mark.slow
def test_pt2_with_dynamic_batch_equals_eager(model_and_checkpoint, tmp_path, capsys):
    model, ckpt = model_and_checkpoint
    out = tmp_path / "demo.pt2"
    printed = run_export(capsys, "--checkpoint", ckpt, "--output", out, "--dynamic-batch", "--opts",
                         "DATA.INTERPOLATION", "bilinear", "TEST.CROP", "False")
    assert "max |difference| from the eager model" in printed
    stage_lines(printed, "tracing", "checking the program", "writing")
    extra = {"preprocessing.json": "", "class_names.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["preprocessing.json"]) == preprocessing(["batch", 3, 64, 64], "bilinear", 1.0, "squash")
    assert extra["class_names.json"] == ""  # the checkpoint has none
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert_agree(program.module()(x), model(x), 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))


@pytest.mark.slow
def test_onnx_at_another_size_with_dynamic_batch_equals_eager(model_and_checkpoint, tmp_path, capsys):
    """The project's one ONNX export of v1 (the two-stage demo model, through the tool), run by onnxruntime at two
    batch sizes. onnx, onnxscript and onnxruntime are part of CI (requirements-dev.txt): a missing one fails here."""
    import onnxruntime
    model, ckpt = model_and_checkpoint
    out = tmp_path / "demo.onnx"
    printed = run_export(capsys, "--checkpoint", ckpt, "--output", out, "--img-size", 48, 80, "--dynamic-batch")
    stage_lines(printed, "tracing", "checking the program", "converting to ONNX",
                "checking the ONNX file with onnxruntime")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert given.shape == ["batch", 3, 48, 80] and returned.shape == ["batch", 10]
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["preprocessing.json"]) == preprocessing(["batch", 3, 48, 80])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 48, 80, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():  # onnxruntime's own float32 kernels: another summation order
            assert_agree(torch.from_numpy(got), model(x), 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))


@pytest.mark.parametrize("args,message", [
    (["--output", "{tmp}/m.tflite"], "--output"),
    (["--output", "{tmp}/m.pt2", "--img-size", "1", "2", "3"], "--img-size"),
    (["--output", "{tmp}/m.pt2", "--dynamic-batch", "--batch-size", "1025"], "--batch-size 1025: the dynamic batch"),
    (["--output", "{tmp}/m.onnx", "--batch-size", "4096", "--dynamic-batch"], "--batch-size 4096: the dynamic batch"),
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/", "--dynamic-batch"], "is a folder"),
])
def test_bad_flags_are_refused_by_name(model_and_checkpoint, tmp_path, capsys, args, message):
    """argparse's usage error (exit status 2) naming the flag, in process (test_reliability runs the tool as a
    process for its one-line errors)."""
    _, ckpt = model_and_checkpoint
    with pytest.raises(SystemExit) as stop:
        export_tool.parse_args(["--cfg", CFG, "--checkpoint", str(ckpt), *[a.format(tmp=tmp_path) for a in args]])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_static_batch_may_exceed_the_dynamic_bound(model_and_checkpoint, tmp_path):
    _, ckpt = model_and_checkpoint
    args = export_tool.parse_args(["--cfg", CFG, "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.pt2"),
                                   "--batch-size", "2048"])
    assert args.batch_size == 2048


def test_unreadable_checkpoint_is_named_and_nothing_is_written(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    args = export_tool.parse_args(["--cfg", CFG, "--checkpoint", str(bad), "--output", str(tmp_path / "m.pt2")])
    with pytest.raises(UsageError, match=f"--checkpoint {bad}"):
        export_tool.export(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


@pytest.mark.slow
@pytest.mark.parametrize("cfg, suffix", [(CFG, ".pt2"), (V2_CFG, ".onnx")], ids=["focal-pt2", "focalv2-onnx"])
def test_a_failed_check_writes_nothing(cfg, suffix, tmp_path, monkeypatch):
    """With a tolerance nothing meets, the tool refuses and leaves no file. The .onnx case is the project's one
    focalv2 ONNX export: its file is written, run by onnxruntime and refused, and the difference it reports must
    still be float32 rounding."""
    _, ckpt = write_checkpoint(cfg, tmp_path / "checkpoint")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = export_tool.parse_args(["--cfg", str(REPO / cfg), "--opts", *TWO_STAGES, "--checkpoint", str(ckpt),
                                   "--output", str(out_dir / f"demo{suffix}")])
    monkeypatch.setattr(export_tool, "TOLERANCE", -1.0)
    failing_check = "the exported program differs"
    if suffix == ".onnx":
        monkeypatch.setattr(export_tool, "max_difference", lambda *a: -2.0)  # the program's check passes
        failing_check = "onnxruntime's output differs"
    with pytest.raises(UsageError, match=f"{failing_check} from the model by .*nothing written") as refusal:
        export_tool.export(args)
    assert not any(out_dir.iterdir())
    if suffix == ".onnx":
        assert 0 <= float(re.search(r"by (\S+) ", str(refusal.value)).group(1)) < 1e-4
