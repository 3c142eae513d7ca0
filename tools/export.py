"""Export a model with its weights to a ``torch.export`` program (``.pt2``) or to ONNX, and check the result.

    python -m tools.export --cfg configs/focal_tiny_patch4_window7_224.yaml --checkpoint focal-tiny-is224-ws7.pth \
        --output focal_tiny.onnx --dynamic-batch

The format follows the output's suffix. The program is traced at one image size (``--img-size``, by default the
config's ``DATA.IMG_SIZE``): the focal layouts for that size become constants of the graph, so other sizes need
another export. Before anything is written, the exported program is run on a random batch and compared with the
eager model; the file is written atomically, so a failed export never leaves a partial file behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.export import Dim, ExportedProgram

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import HelpFormatter  # noqa: E402
from errors import UsageError  # noqa: E402
from predict import load_model  # noqa: E402
from utils import atomic_write, ensure_writable_folder  # noqa: E402

FORMATS = {".pt2": "torch.export", ".onnx": "ONNX"}
TOLERANCE = 1e-4  # the largest |difference| from the eager logits that is accepted
# Where an export carries the checkpoint's class names (JSON list): a .pt2 extra file, an ONNX metadata entry.
CLASS_NAMES = "class_names.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--cfg", required=True, help="model config file")
    parser.add_argument("--opts", nargs="+", action="extend", default=[], help="config overrides: KEY VALUE ...")
    parser.add_argument("--checkpoint", required=True, help="weights: ours, a released file, or a bare state dict")
    parser.add_argument("--output", required=True, help="the file to write, .pt2 or .onnx")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (--model-ema)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="SIZE",
                        help="H W (or one size for both) to trace at; default DATA.IMG_SIZE")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size, not only --batch-size")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size to trace and check with; at least 2 "
                        "is used with --dynamic-batch, as torch.export would fix a batch of 1 as a constant")
    args = parser.parse_args(argv)
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in FORMATS:
        parser.error(f"--output {args.output}: the suffix must be one of {', '.join(FORMATS)}")
    if args.img_size is not None and (len(args.img_size) > 2 or min(args.img_size) < 1):
        parser.error("--img-size takes one or two positive sizes")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> ExportedProgram:
    shapes = ({0: Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


def max_difference(program: ExportedProgram, model: nn.Module, example: torch.Tensor) -> float:
    with torch.no_grad():
        return (program.module()(example) - model(example)).abs().max().item()


def to_onnx(program: ExportedProgram):
    try:
        import onnxscript  # noqa: F401  torch.onnx's exporter needs it, and it brings onnx
    except ImportError:
        raise UsageError("--output *.onnx needs the onnx and onnxscript packages: "
                         "pip install onnx onnxscript") from None
    # core ATen decompositions first: torch.onnx's own table rejects a reshape in the window merge (torch 2.14)
    return torch.onnx.export(program.run_decompositions(), dynamo=True, verbose=False)


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
        diff = (torch.from_numpy(logits) - model(example)).abs().max().item()
    if not diff <= TOLERANCE:  # a NaN difference fails too
        raise UsageError(f"onnxruntime's output differs from the model by {diff:.3g} (> {TOLERANCE}); nothing written")
    return diff


def save_program(program: ExportedProgram, path: str, names: Optional[List[str]]) -> None:
    """``torch.export.save`` through an open file (torch warns about a file name without ``.pt2``, which the
    temporary file has), with the checkpoint's class names as ``class_names.json`` when it stores them."""
    with open(path, "wb") as f:
        torch.export.save(program, f, extra_files={CLASS_NAMES: json.dumps(names)} if names else None)


def export(args: argparse.Namespace) -> None:
    ensure_writable_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
    model, config, names = load_model(args.cfg, args.opts, args.checkpoint, torch.device("cpu"), args.ema)
    height, width = (args.img_size * 2)[:2] if args.img_size else (config.DATA.IMG_SIZE,) * 2
    batch = max(2, args.batch_size) if args.dynamic_batch else args.batch_size
    example = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    print(f"tracing {config.MODEL.NAME} at {height}x{width}, batch {'dynamic' if args.dynamic_batch else batch}",
          flush=True)
    program = export_program(model, example, args.dynamic_batch)
    diff = max_difference(program, model, example)
    if not diff <= TOLERANCE:  # a NaN difference fails too
        raise UsageError(f"the exported program differs from the model by {diff:.3g} (> {TOLERANCE}); nothing written")
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix == ".pt2":
        atomic_write(args.output, lambda path: save_program(program, path, names))
    else:
        onnx_diffs = []

        def save_checked(path: str) -> None:  # checked before the rename: a failing file never gets the name
            onnx_program = to_onnx(program)
            if names:
                onnx_program.model.metadata_props[CLASS_NAMES] = json.dumps(names)
            onnx_program.save(path)
            onnx_diffs.append(onnx_difference(path, model, example))
        atomic_write(args.output, save_checked)
        diff = max(diff, *onnx_diffs)
    print(f"wrote {args.output} ({FORMATS[suffix]}); "
          f"max |difference| from the eager model: {diff:.2g}")


if __name__ == "__main__":
    try:
        export(parse_args())
    except UsageError as err:
        sys.exit(f"tools/export.py: error: {err}")
