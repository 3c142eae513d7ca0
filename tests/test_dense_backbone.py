"""dense/backbone.py: the stages it returns and their norms, frozen stages that stay frozen through ``train()``,
gradient checkpointing that changes memory, not results, and --pretrained from a classification checkpoint (the
norms created fresh, and said so) or from a dense one (the norms too)."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from config import UsageError, merge_opts
from dense.backbone import DenseBackbone
from detection.config import detection_defaults
from detection.model import backbone, build_detector
from models import extract_state_dict
from tests.helpers import BACKBONE_OPTS, CHECKPOINT, LOG
from utils import load_backbone

ARGS = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 8], window_size=7, drop_path_rate=0.0)
NAME = "focal_tiny_patch4_window7_224"


def test_out_indices_pick_stages_and_each_gets_its_norm():
    torch.manual_seed(0)
    net = DenseBackbone(NAME, (1, 3), **ARGS)
    for index in (1, 3):
        norm = getattr(net, f"norm{index}")
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 64, 96)
    outputs = net(x)
    raw = net.body(x)
    assert [o.shape[1:] for o in outputs] == [(32, 8, 12), (128, 2, 3)]
    assert not hasattr(net, "norm0") and not hasattr(net, "norm2")
    for index, out, stage in zip((1, 3), outputs, raw):
        expected = torch.nn.functional.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2],
                                                  getattr(net, f"norm{index}").weight,
                                                  getattr(net, f"norm{index}").bias, 1e-5).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("frozen, stages", [(-1, 0), (0, 0), (2, 2)])
def test_frozen_stages_get_no_gradients_and_stay_in_eval_mode(frozen, stages):
    net = DenseBackbone(NAME, (0, 1, 2, 3), frozen_stages=frozen, **{**ARGS, "drop_path_rate": 0.1})
    net.train()
    model = net.network
    frozen_modules = ([model.patch_embed] if frozen >= 0 else []) + list(model.layers[:stages])
    trained_modules = list(model.layers[stages:]) + ([] if frozen >= 0 else [model.patch_embed])
    assert all(not p.requires_grad for m in frozen_modules for p in m.parameters())
    assert all(not m.training for f in frozen_modules for m in f.modules())
    assert all(p.requires_grad for m in trained_modules for p in m.parameters())
    assert all(m.training for t in trained_modules for m in t.modules())
    sum(o.sum() for o in net(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is None for m in frozen_modules for p in m.parameters())
    assert all(p.grad is not None for m in trained_modules for p in m.parameters())


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = DenseBackbone(NAME, (0, 1, 2, 3), grad_checkpointing=checkpointing, **ARGS)
        assert all(stage.grad_checkpointing == checkpointing for stage in net.network.layers)
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        outputs = net(x)
        sum((o ** 2).sum() for o in outputs).backward()
        results.append((outputs, [p.grad for p in net.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def detector():
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.FPN_CHANNELS", 16])
    return build_detector(config, num_classes=3)


def test_classification_checkpoint_loads_and_the_norms_are_named_fresh(caplog):
    net = backbone(detector())
    with caplog.at_level(logging.INFO, logger=LOG.name):
        load_backbone(CHECKPOINT, net, LOG)
    weights = extract_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    # counted in the checkpoint's tensors: all but its classifier's (final norm and head, 2 tensors each) and the
    # released file's 22 index tables load; the 4 output norms (2 tensors each) are named fresh
    network = len(net.network.state_dict())
    assert len(weights) == network + 4 + 22
    assert (f"pretrained backbone from {CHECKPOINT}: {network} of its {network + 26} tensors loaded; 0 resized; 0 "
            f"derived from its tables; 8 left at initial values: norm0.weight, norm0.bias, norm1.weight and 5 more; "
            f"22 index tables not loaded") in caplog.text
    for name, value in net.network.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_a_classification_checkpoint_made_at_a_smaller_size_gets_its_missing_neighbour_tables_derived(tmp_path,
                                                                                                        caplog):
    """Trained at 64 px with window 4, stages 2 and 3 (maps of 4x4 and 2x2) fit in one window and have no neighbour
    tables; the dense backbone's stages at detection sizes need them, and the load was refused as missing keys.
    They are derived from the checkpoint's window tables, as ``main.py --pretrained`` does, and named."""
    import timm
    args = {**ARGS, "window_size": 4}
    small = timm.create_model(NAME, img_size=64, num_classes=5, **args)
    path = tmp_path / "classifier_64.pth"
    torch.save({"model": small.state_dict()}, path)
    dense = DenseBackbone(NAME, (0, 1, 2, 3), **args)
    missing = sorted(set(dense.network.state_dict()) - set(small.state_dict()))
    assert missing and all(name.endswith("_to_neighbors") for name in missing)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        load_backbone(str(path), dense, LOG)
    assert f"{len(missing)} derived from its tables: {missing[0]}" in caplog.text
    for name, value in small.state_dict().items():
        if name in dense.network.state_dict() and value.shape == dense.network.state_dict()[name].shape:
            torch.testing.assert_close(dense.network.state_dict()[name], value, rtol=0, atol=0)


def test_dense_checkpoint_loads_with_its_norms(tmp_path, caplog):
    trained = detector()
    with torch.no_grad():
        for p in backbone(trained).parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "dense.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    fresh = backbone(detector())
    with caplog.at_level(logging.INFO, logger=LOG.name):
        load_backbone(str(path), fresh, LOG)
    assert re.search(rf"pretrained backbone and output norms from the dense checkpoint {path}: (\d+) of its \d+ "
                     rf"tensors loaded; 0 resized; 0 derived from its tables; 0 left at initial values: none", caplog.text)
    torch.testing.assert_close(fresh.state_dict(), backbone(trained).state_dict(), rtol=0, atol=0)
    smaller = DenseBackbone(NAME, (0, 1, 2, 3), **{**ARGS, "embed_dim": 8})
    with pytest.raises(UsageError, match="does not fit"):
        load_backbone(str(path), smaller, LOG)


def test_a_dense_checkpoint_with_more_stages_loads_into_a_backbone_with_fewer(tmp_path, caplog):
    """The guide says ``--pretrained`` takes a checkpoint of either dense task; but Mask R-CNN and segmentation
    checkpoints carry norm0 (stage 0 reaches their decoders), which RetinaNet and FCOS (stages 1-3) do not have,
    and the load was refused for those two unexpected keys. The stage the backbone does not output is left out,
    as the log says; everything else must load exactly."""
    trained = detector()
    with torch.no_grad():
        for p in backbone(trained).parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    fewer = DenseBackbone(NAME, (1, 2, 3), **ARGS)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        load_backbone(str(path), fewer, LOG)
    assert "(left out: norm0, stages this backbone does not output)" in caplog.text
    expected = backbone(trained).state_dict()
    for name, value in fewer.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

def test_without_norms_the_raw_stage_maps_come_out():
    net = DenseBackbone(NAME, (0, 2), norms=False, **ARGS)
    x = torch.randn(1, 3, 64, 64)
    for got, raw in zip(net(x), net.body(x)):
        torch.testing.assert_close(got, raw, rtol=0, atol=0)
    assert not any("norm" in name for name, _ in net.named_parameters() if not name.startswith("body."))
