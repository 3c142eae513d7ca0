"""The golden-case recipe (tests/fixtures/README.md): parameters as a pure function of name and shape, seeded input.
The fixture tests, tools.make_fixtures and tools.gpu_check all build their cases through it."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any, Dict, List

import torch

from config import load_config
from models import build_model

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CASE_FILES = sorted(FIXTURES.glob("*.json"))


def load_case(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


def case_opts(case: Dict[str, Any]) -> List[Any]:
    opts = ["MODEL.TYPE", case["model_type"], "DATA.IMG_SIZE", case["img_size"],
            "MODEL.NUM_CLASSES", case["num_classes"], "MODEL.DROP_RATE", 0.0, "MODEL.DROP_PATH_RATE", 0.0]
    for key, value in case["focal"].items():
        opts += ["MODEL.FOCAL." + key, value]
    return opts


def fill_value(name: str, shape: List[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) == 1 and name.endswith("weight"):
        value = 1.0 + 0.1 * r
    elif len(shape) == 1:
        value = 0.1 * r
    else:
        value = r / math.sqrt(max(1, math.prod(shape[1:])))
    return value.to(torch.float32)


def build_filled(case: Dict[str, Any], extra_opts: List[Any] = ()) -> torch.nn.Module:
    model = build_model(load_config(opts=case_opts(case) + list(extra_opts))).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in case["parameters"]:
            params[name].copy_(fill_value(name, shape))
    return model


def case_input(case: Dict[str, Any]) -> torch.Tensor:
    """Seeded images with the case's ``IN_CHANS`` channels (3 unless the case sets it)."""
    size, channels = case["img_size"], case["focal"].get("IN_CHANS", 3)
    return torch.randn(case["batch"], channels, size, size, generator=torch.Generator().manual_seed(0))
