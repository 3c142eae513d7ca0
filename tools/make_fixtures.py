"""Write a golden fixture (tests/fixtures/*.json) by running the reference implementation on one config.

    python -m tools.make_fixtures --reference /path/to/Focal-Transformer \
        --cfg configs/focal_tiny_patch4_window7_224.yaml --opts MODEL.NUM_CLASSES 10 MODEL.FOCAL.EMBED_DIM 16 \
        --output tests/fixtures/my_case.json

The reference (a microsoft/Focal-Transformer checkout, never bundled) is imported as it is, its parameters filled
by the recipe of tests/fixtures/README.md; the file records parameter and buffer names and shapes, FLOPs and
logits on the seeded input (float32, CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Sequence

import torch
from yacs.config import CfgNode

from config import UsageError, _C, error_text, load_config
from tools.golden import case_input, fill_value
from utils import atomic_write

REFERENCE = "focal_reference"  # the module name the reference's classification package is imported as
# MODEL.FOCAL keys the reference's build_model reads; the others of our tree have no counterpart there
REFERENCE_KEYS = ("PATCH_SIZE", "IN_CHANS", "EMBED_DIM", "DEPTHS", "NUM_HEADS", "WINDOW_SIZE", "MLP_RATIO",
                  "QKV_BIAS", "QK_SCALE", "APE", "PATCH_NORM", "USE_SHIFT", "FOCAL_POOL", "FOCAL_STAGES",
                  "FOCAL_LEVELS", "FOCAL_WINDOWS", "EXPAND_STAGES", "EXPAND_SIZES", "EXPAND_LAYER",
                  "USE_CONV_EMBED", "USE_LAYERSCALE", "USE_PRE_NORM", "FOCAL_TOPK")


def import_package(folder: Path, name: str) -> ModuleType:
    """The package in ``folder`` (the reference's, or another checkout's) imported as ``name``, so that it cannot
    shadow ours; with the one name the reference imports that current timm lacks."""
    import timm.data.transforms as timm_transforms
    if not hasattr(timm_transforms, "_pil_interp"):  # renamed str_to_pil_interp in timm 0.6
        timm_transforms._pil_interp = timm_transforms.str_to_pil_interp
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_reference(checkout: Path) -> ModuleType:
    if not (checkout / "classification" / "__init__.py").is_file():
        raise UsageError(f"--reference {checkout}: no classification/__init__.py; pass the root of a "
                         "microsoft/Focal-Transformer checkout")
    return import_package(checkout / "classification", REFERENCE)


def focal_keys(config) -> Dict[str, Any]:
    """The MODEL.FOCAL keys that differ from the defaults; refuses options the reference does not have."""
    changed = {k: v for k, v in config.MODEL.FOCAL.items() if v != _C.MODEL.FOCAL[k]}
    foreign = sorted(set(changed) - set(REFERENCE_KEYS))
    if foreign:
        raise ValueError(f"MODEL.FOCAL.{foreign[0]} has no counterpart in the reference; leave it at its default")
    return changed


def build_reference(reference: ModuleType, config: CfgNode) -> torch.nn.Module:
    """The reference's model of ``config`` in eval mode. The reference ignores ``EXPAND_STAGES``, so it gets that
    key folded into ``EXPAND_SIZES``."""
    f = config.MODEL.FOCAL
    config = config.clone()
    config.defrost()
    config.MODEL.FOCAL.EXPAND_SIZES = [size if i in f.EXPAND_STAGES else 0 for i, size in enumerate(f.EXPAND_SIZES)]
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints "Creating model"
        return reference.build_model(config).eval()


def make_case(reference: ModuleType, name: str, cfg: Optional[str], opts: Sequence[Any], batch: int) -> Dict[str, Any]:
    try:  # the user's config, not the reference's code: refused in one line naming it
        config = load_config(cfg, list(opts) + ["MODEL.DROP_RATE", 0.0, "MODEL.DROP_PATH_RATE", 0.0])
        focal = focal_keys(config)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"config (--cfg {cfg} / --opts): {error_text(err)}") from None
    case = {"name": name, "model_type": config.MODEL.TYPE, "img_size": config.DATA.IMG_SIZE,
            "num_classes": config.MODEL.NUM_CLASSES, "batch": batch, "focal": focal}
    model = build_reference(reference, config)
    parameters = [[n, list(p.shape)] for n, p in model.named_parameters()]
    with torch.no_grad():
        for (n, shape), p in zip(parameters, model.parameters()):
            p.copy_(fill_value(n, shape))
        output = model(case_input(case))
    case.update(n_parameters=sum(p.numel() for p in model.parameters()), flops=int(model.flops()),
                output=output.tolist(), output_std=output.std().item(), parameters=parameters,
                buffers=[[n, list(b.shape)] for n, b in model.named_buffers()])
    return case


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="root of a microsoft/Focal-Transformer checkout")
    parser.add_argument("--cfg", help="YAML config (our configs/ format)")
    parser.add_argument("--opts", nargs="*", default=[], help="KEY VALUE pairs merged after --cfg")
    parser.add_argument("--output", type=Path, required=True, help="fixture to write; its stem is the case name")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    try:
        case = make_case(import_reference(args.reference), args.output.stem, args.cfg, args.opts, args.batch)
    except UsageError as err:
        parser.error(str(err))
    text = json.dumps(case)
    atomic_write(str(args.output), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.output}: {case['n_parameters']} parameters, {case['flops']} FLOPs, "
          f"output std {case['output_std']:.4f}")


if __name__ == "__main__":
    main()
