"""Defaults that depend on the machine (the autocast precision) and the device switches."""
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


def test_channels_last_changes_the_layout_not_the_outputs():
    from tests.helpers import randomise, tiny_config
    from models import build_model
    torch.manual_seed(0)
    model = randomise(build_model(tiny_config("MODEL.FOCAL.USE_CONV_EMBED", True))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        nhwc = model.to(memory_format=torch.channels_last)
        assert nhwc.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(nhwc(x), expected, atol=1e-5, rtol=1e-5)
