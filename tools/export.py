"""Export a model with its weights to a ``torch.export`` program (``.pt2``) or to ONNX, and check the result.

    python -m tools.export --cfg configs/focal_tiny_patch4_window7_224.yaml --checkpoint focal-tiny-is224-ws7.pth \
        --output focal_tiny.onnx --dynamic-batch

The format follows the output's suffix. The program is traced at one image size (the focal layouts become
constants of the graph) and compared with the eager model before the file is written, atomically; the file
carries what a user needs to feed it (``preprocessing.json``) and the checkpoint's class names.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.export import Dim, ExportedProgram

from config import HelpFormatter, UsageError, path_arg
from data.transforms import build_transform, eval_crop
from logger import Progress, duration
from predict import load_model
from utils import atomic_write, ensure_writable_folder

FORMATS = {".pt2": "torch.export", ".onnx": "ONNX"}
TOLERANCE = 1e-4  # the largest |difference| from the eager logits that is accepted
BATCH_AXIS, MAX_BATCH = "batch", 1024  # the dynamic batch axis: its name in the files, its upper bound
# What an export carries beside the program, as JSON: .pt2 extra files, ONNX metadata entries.
CLASS_NAMES = "class_names.json"  # the checkpoint's class names, when it stores them
PREPROCESSING = "preprocessing.json"  # see preprocessing()
# The stages' rough shares of an export's time (Focal-T at 224 on one CPU thread), for the time left.
STAGE_COST = {"tracing": 9, "checking the program": 2, "writing": 1, "converting to ONNX": 150,
              "checking the ONNX file with onnxruntime": 1}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--cfg", required=True, help="model config file")
    parser.add_argument("--opts", nargs="+", action="extend", default=[], help="config overrides: KEY VALUE ...")
    parser.add_argument("--checkpoint", required=True, type=path_arg,
                        help="weights: ours, a released file, or a bare state dict")
    parser.add_argument("--output", required=True, type=path_arg, help="the file to write, .pt2 or .onnx")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (--model-ema)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="SIZE",
                        help="H W (or one size for both) to trace at; default DATA.IMG_SIZE")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size, not only --batch-size")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size to trace and check with; at least 2 "
                        "is used with --dynamic-batch, as torch.export would fix a batch of 1 as a constant")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a folder: name the file to write in it")
    if os.path.splitext(args.output)[1].lower() not in FORMATS:
        parser.error(f"--output {args.output}: the suffix must be one of {', '.join(FORMATS)}")
    if args.img_size is not None and (len(args.img_size) > 2 or min(args.img_size) < 1):
        parser.error("--img-size takes one or two positive sizes")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.dynamic_batch and args.batch_size > MAX_BATCH:
        parser.error(f"--batch-size {args.batch_size}: the dynamic batch axis goes up to {MAX_BATCH}")
    return args


class Stages(Progress):
    """A progress line as each stage of an export starts, with the time left at the shares of :data:`STAGE_COST`
    of the stages done so far."""

    def __init__(self, names: Sequence[str]):
        super().__init__(sum(STAGE_COST[name] for name in names), every=1)
        self.names, self.current = list(names), None

    def __call__(self, name: str) -> None:
        if self.current:
            self.due(self.done + STAGE_COST[self.current] - 1)
        eta = f", eta {self.eta()}" if self.done else ""
        print(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}{eta}", flush=True)
        self.current = name


def preprocessing(config: Any, shape: List[Any]) -> Dict[str, Any]:
    """What an image goes through before the model sees it in evaluation (``data.transforms``), in the terms of
    timm's ``pretrained_cfg``, and the input shape (its batch axis named when it is dynamic)."""
    normalize = build_transform(False, config).transforms[-1]
    crop_pct, crop_mode = eval_crop(config)
    return {"input_shape": shape, "mean": [round(v, 6) for v in normalize.mean.tolist()],
            "std": [round(v, 6) for v in normalize.std.tolist()], "interpolation": config.DATA.INTERPOLATION,
            "crop_pct": crop_pct, "crop_mode": crop_mode}


def max_difference(program: ExportedProgram, model: nn.Module, example: torch.Tensor) -> float:
    with torch.no_grad():
        return (program.module()(example) - model(example)).abs().max().item()


def checked(what: str, diff: float) -> float:
    if not diff <= TOLERANCE:  # a NaN difference fails too
        raise UsageError(f"{what} differs from the model by {diff:.3g} (> {TOLERANCE}); nothing written")
    return diff


def to_onnx(program: ExportedProgram, metadata: Dict[str, str]):
    """The ONNX program, its dynamic batch axis named :data:`BATCH_AXIS` (torch.export calls it ``s<N>``)."""
    try:
        import onnxscript  # noqa: F401  torch.onnx's exporter needs it, and it brings onnx
    except ImportError:
        raise UsageError("--output *.onnx needs the onnx and onnxscript packages: "
                         "pip install onnx onnxscript") from None
    # core ATen decompositions first: torch.onnx's own table rejects a reshape in the window merge (torch 2.14)
    onnx_program = torch.onnx.export(program.run_decompositions(), dynamo=True, verbose=False)
    batch = onnx_program.model.graph.inputs[0].shape[0]
    if not isinstance(batch, int):
        onnx_program.rename_axes({batch: BATCH_AXIS})
    onnx_program.model.metadata_props.update(metadata)
    return onnx_program


def onnx_difference(path: str, model: nn.Module, example: torch.Tensor) -> float:
    """The written ONNX file run by onnxruntime next to the eager model (0 with a note if it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the ONNX file itself was not run (pip install onnxruntime)")
        return 0.0
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        return (torch.from_numpy(logits) - model(example)).abs().max().item()


def export(args: argparse.Namespace) -> None:
    ensure_writable_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
    model, config, names = load_model(args.cfg, args.opts, args.checkpoint, torch.device("cpu"), args.ema)
    height, width = (args.img_size * 2)[:2] if args.img_size else (config.DATA.IMG_SIZE,) * 2
    batch = max(2, args.batch_size) if args.dynamic_batch else args.batch_size
    example = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    shape = [BATCH_AXIS if args.dynamic_batch else batch, 3, height, width]
    metadata = {PREPROCESSING: json.dumps(preprocessing(config, shape))}
    if names:
        metadata[CLASS_NAMES] = json.dumps(names)
    suffix = os.path.splitext(args.output)[1].lower()
    onnx = suffix == ".onnx"
    last = ["converting to ONNX", "checking the ONNX file with onnxruntime"] if onnx else ["writing"]
    stage = Stages(["tracing", "checking the program", *last])
    print(f"exporting {config.MODEL.NAME} at {height}x{width}, batch {'dynamic' if args.dynamic_batch else batch}, "
          f"to {args.output}", flush=True)
    shapes = ({0: Dim(BATCH_AXIS, min=1, max=MAX_BATCH)},) if args.dynamic_batch else None
    stage("tracing")
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    stage("checking the program")
    diffs = [checked("the exported program", max_difference(program, model, example))]

    def write(path: str) -> None:  # checked before the rename: a failing file never gets the name
        if onnx:
            stage("converting to ONNX")
            to_onnx(program, metadata).save(path)
            stage("checking the ONNX file with onnxruntime")
            diffs.append(checked("onnxruntime's output", onnx_difference(path, model, example)))
        else:
            stage("writing")
            with open(path, "wb") as f:  # a file object: torch warns of a name without .pt2, as the temporary's
                torch.export.save(program, f, extra_files=metadata)
    atomic_write(args.output, write)
    print(f"wrote {args.output} ({FORMATS[suffix]}) in {duration(stage.elapsed())}; max |difference| from the eager "
          f"model: {max(diffs):.2g}")


if __name__ == "__main__":
    try:
        export(parse_args())
    except UsageError as err:
        sys.exit(f"tools/export.py: error: {err}")
