"""Defaults that depend on the machine: the autocast precision."""
from __future__ import annotations

import torch

from engine import build_precision, default_amp


def test_amp_defaults_to_bf16_on_gpus_that_support_it(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert default_amp(cuda) == "bf16"
    precision = build_precision("", cuda)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()  # bf16 needs no scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_amp(cuda) == "fp16"
    assert default_amp(cpu) == "none" and build_precision("", cpu).dtype is None
