"""Fine-tuning (issue #14): every pretrained tensor reaches a model of another image, window or focal-window size;
layer-wise learning-rate decay; EMA; the best checkpoint; --compile; class names in predict.py."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from config import load_config
from lr_scheduler import build_scheduler
from main import main
from models import build_model
from models.focal_layout import FocalLayoutSpec
from models.resize import adapt_geometry, neighbour_table_from_window_table, resize_neighbour_table, resize_pool_weight
from optimizer import build_optimizer
from utils import load_pretrained

from tests.helpers import (DEMO_CFG, LOG, REPO, demo_args, eval_summary, randomise, read_log, run_dir,
                           sum_roundoff)

# utils.log_load's first line: loaded of the checkpoint's tensors, resized, derived, left at initial values (names)
LOAD_LINE = re.compile(r"pretrained (\S+): (\d+) of its (\d+) tensors loaded; (\d+) resized(?:: [^;]*)?; (\d+) derived from "
                       r"its tables(?:: ([^;]*))?; (\d+) left at initial values: ([^;\n]*)")


def demo_model(*opts):
    return build_model(load_config(DEMO_CFG, list(opts)))


GEOMETRIES = {
    "image 64 -> 96": ("DATA.IMG_SIZE", 96),
    "image 64 -> 96, window 4 -> 6": ("DATA.IMG_SIZE", 96, "MODEL.FOCAL.WINDOW_SIZE", 6,
                                      "MODEL.FOCAL.EXPAND_SIZES", [3, 3, 3, 3]),
    "image 64 -> 128, window 4 -> 8, focal windows": ("DATA.IMG_SIZE", 128, "MODEL.FOCAL.WINDOW_SIZE", 8,
                                                      "MODEL.FOCAL.FOCAL_WINDOWS", [5, 5, 3, 1]),
    "conv pooling, image 64 -> 96, window 4 -> 6": ("MODEL.FOCAL.FOCAL_POOL", "conv", "DATA.IMG_SIZE", 96,
                                                    "MODEL.FOCAL.WINDOW_SIZE", 6),
}


@pytest.mark.parametrize("change", GEOMETRIES)
def test_every_pretrained_tensor_reaches_a_model_of_another_geometry(change, tmp_path, caplog):
    opts = GEOMETRIES[change]
    pool = list(opts[:2]) if opts[0] == "MODEL.FOCAL.FOCAL_POOL" else []
    source = randomise(demo_model("DATA.IMG_SIZE", 64, *pool), std=0.1)  # as if trained: no tensor left at a
    # value a fresh model could also have
    torch.save({"model": source.state_dict()}, tmp_path / "source.pth")
    target = demo_model(*opts)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="focal.test"):
        load_pretrained(str(tmp_path / "source.pth"), target, LOG)
    lines = [m for m in map(LOAD_LINE.search, caplog.text.splitlines()) if m]
    assert len(lines) == 1, caplog.text
    loaded, size, resized, derived, derived_names, left, names = lines[0].group(2, 3, 4, 5, 6, 7, 8)
    own, trained = target.state_dict(), source.state_dict()
    # counted in the checkpoint's tensors: every one of them loads, and the model's tensors the checkpoint lacks
    # (neighbour tables of a window the map outgrew) are derived, not loaded
    assert (left, names) == ("0", "none") and int(resized) > 0 and int(loaded) == int(size) == len(trained)
    assert int(loaded) + int(derived) == len(own)
    assert (derived_names or "").split(", ")[:int(derived)] == [name for name in own if name not in trained][:3]
    for name, value in own.items():
        if name in trained and trained[name].shape == value.shape:
            assert torch.equal(value, trained[name]), name
        elif value.is_floating_point():
            assert not torch.equal(value, initial[name]), f"{name} kept its initial value"
    target(torch.randn(1, 3, opts[opts.index("DATA.IMG_SIZE") + 1], opts[opts.index("DATA.IMG_SIZE") + 1]))


def test_a_head_of_another_class_count_is_the_only_thing_left_at_initial_values(tmp_path, caplog):
    torch.save({"model": demo_model().state_dict()}, tmp_path / "source.pth")
    with caplog.at_level(logging.INFO, logger="focal.test"):
        load_pretrained(str(tmp_path / "source.pth"), demo_model("MODEL.NUM_CLASSES", 5), LOG)
    assert LOAD_LINE.search(caplog.text).group(2, 7, 8) == ("100", "2", "head.weight, head.bias")  # 102 - the head


def test_neighbour_table_derived_from_a_window_table_takes_the_bias_of_each_offset():
    window, expand, heads = 4, 2, 2
    offsets = torch.tensor([(dy, dx) for dy in range(-window + 1, window) for dx in range(-window + 1, window)])
    table = (100.0 * offsets[:, :1] + offsets[:, 1:]).repeat(1, heads)  # bias = 100*dy + dx, every head
    n = len(FocalLayoutSpec(window, expand).released_surroundings())
    derived = neighbour_table_from_window_table(table, torch.Size((1, heads, window * window, n)))
    for column, (a, b, dy, dx) in enumerate(FocalLayoutSpec(window, expand).released_surroundings()):
        for qy in range(window):
            for qx in range(window):
                ky, kx = a + dy - qy, b + dx - qx  # the key's offset from the query
                clamp = lambda v: max(-window + 1, min(window - 1, v))  # noqa: E731
                assert derived[0, 1, qy * window + qx, column] == 100 * clamp(ky) + clamp(kx)


def test_neighbour_table_resize_is_the_identity_at_the_same_size_and_keeps_values_when_growing():
    table = torch.randn(1, 3, 16, len(FocalLayoutSpec(4, 2).released_surroundings()))
    assert torch.equal(resize_neighbour_table(table, table.shape), table)
    grown = resize_neighbour_table(table, torch.Size((1, 3, 64, len(FocalLayoutSpec(8, 4).released_surroundings()))))
    assert set(grown.unique().tolist()) <= set(table.unique().tolist())  # nearest values, nothing invented


@pytest.mark.parametrize("old, new", [(7, 12), (12, 7)])
def test_position_tables_are_resized_as_timm_resizes_swin_tables(old, new):
    """Window and pooled tables are (2w-1)^2 grids of offsets: resampled exactly as timm carries Swin-T's tables to
    another window (bicubic), so a fine-tuned model starts from the same biases in both codebases."""
    from timm.layers import resize_rel_pos_bias_table_simple
    side = 2 * new - 1
    flat = torch.randn((2 * old - 1) ** 2, 3)  # (offsets, heads), the window table's layout
    expected = resize_rel_pos_bias_table_simple(flat, (new, new), (side * side, 3))
    window = adapt_geometry("layers.0.blocks.0.attn.relative_position_bias_table", flat, torch.empty(side * side, 3),
                            {})
    pooled = adapt_geometry("layers.0.blocks.0.attn.relative_position_bias_table_to_windows.0", flat.t(),
                            torch.empty(3, side * side), {})
    torch.testing.assert_close(window, expected)
    torch.testing.assert_close(pooled, expected.t())


def test_pooling_kernels_keep_their_sum_when_resized():
    mean = torch.full((1, 4), 0.25)
    grown = resize_pool_weight(mean, torch.Size((1, 9)))
    torch.testing.assert_close(grown, torch.full((1, 9), 1 / 9))
    conv = torch.randn(8, 1, 2, 2)
    # float32 rounding of the bilinear resampling (two steps of two terms), the rescaling and the two sums (up to 9
    # terms), relative to the largest sum of absolute weights
    bound = sum_roundoff(torch.float32, terms=9, steps=4) * float(conv.abs().sum((1, 2, 3)).max())
    torch.testing.assert_close(resize_pool_weight(conv, torch.Size((8, 1, 3, 3))).sum((1, 2, 3)), conv.sum((1, 2, 3)),
                               atol=bound, rtol=0)


def test_layer_decay_scales_each_depth_and_keeps_the_no_decay_rules():
    config = load_config(DEMO_CFG, ["TRAIN.LAYER_DECAY", 0.5])
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 10)
    scheduler.step_update(40)  # past warm-up
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    scale = lambda name: group_of[id(params[name])]["lr_scale"]  # noqa: E731
    depth_order = ["patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight", "layers.0.downsample.proj.weight",
                   "layers.1.blocks.0.mlp.fc1.weight", "layers.2.blocks.0.mlp.fc1.weight",
                   "layers.2.blocks.1.mlp.fc1.weight", "layers.3.blocks.0.mlp.fc1.weight", "head.weight"]
    scales = [scale(n) for n in depth_order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] == 1.0
    assert all(b / a == pytest.approx(2.0) or b / a == pytest.approx(4.0) for a, b in zip(scales, scales[1:]))
    top = max(g["lr"] for g in optimizer.param_groups)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(top * group["lr_scale"])
    for name in ("layers.0.blocks.0.attn.relative_position_bias_table", "norm.weight", "head.bias"):
        assert group_of[id(params[name])]["weight_decay"] == 0.0
    assert group_of[id(params["head.weight"])]["weight_decay"] == config.TRAIN.WEIGHT_DECAY


@pytest.mark.slow
def test_ema_best_checkpoint_compile_and_class_names_end_to_end(demo_data, tmp_path, entry_points):
    """Two epochs with EMA, layer decay and a compiled model (aot_eager: the compile path without a C++
    toolchain's minutes); then --eval and predict.py on the best checkpoint. Batches of 10 split the 40 training
    and 20 validation images evenly: two graphs (training, evaluation), where a smaller last batch would cost a
    third compile with a symbolic batch size (the model compiled with dynamic shapes is test_models_behaviour's)."""
    main(demo_args(demo_data, tmp_path, "--model-ema", "--compile", "aot_eager",
                   opts=("TRAIN.EPOCHS", "2", "TRAIN.LAYER_DECAY", "0.8", "MODEL_EMA_DECAY", "0.5",
                         "DATA.BATCH_SIZE", "10")))
    log = read_log(tmp_path)
    assert log.count("Accuracy of the EMA model on the 20 test images") == 2
    best = run_dir(tmp_path) / "ckpt_best.pth"
    state = torch.load(best, weights_only=True)
    ema_scores = [float(s) for s in re.findall(r"Accuracy of the EMA model on the 20 test images: ([\d.]+)%", log)]
    assert state["max_accuracy"] == pytest.approx(max(ema_scores), abs=0.05)  # logged to 0.1: half of it
    assert state["class_names"] == sorted(p.name for p in (demo_data / "train").iterdir())
    assert not torch.equal(state["model_ema"]["head.weight"], state["model"]["head.weight"])

    main(demo_args(demo_data, tmp_path / "eval", "--eval", "--resume", str(best)))
    eval_log = read_log(tmp_path / "eval")
    assert "Accuracy of the network" in eval_log and "Accuracy of the EMA model" in eval_log

    image = sorted((demo_data / "val" / "circle").iterdir())[0]
    done = entry_points.run(["predict.py", "--cfg", DEMO_CFG, "--opts", "DATA.IMG_SIZE", "32", "--checkpoint",
                             str(best), "--ema", "--topk", "10", str(image)], timeout=120)
    assert done.returncode == 0, done.stderr
    printed = re.findall(r"^\s+[\d.]+\s+\d+ (\S+)$", done.stdout, re.M)
    assert sorted(printed) == state["class_names"]
    assert eval_summary(eval_log)["images"] == 20


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window12_384_finetune",
                                  "focal_tiny_useconv_patch4_window12_384_finetune",
                                  "focalv2_tiny_useconv_patch4_window12_384_finetune"])
@pytest.mark.slow
def test_finetune_configs_take_every_tensor_of_their_released_224_model(name, tmp_path, caplog):
    config = load_config(str(REPO / "configs" / "finetune" / f"{name}.yaml"))
    parent = name.replace("window12_384_finetune", "window7_224")
    torch.save({"model": build_model(load_config(str(REPO / "configs" / f"{parent}.yaml"))).state_dict()},
               tmp_path / "released.pth")
    assert (config.DATA.IMG_SIZE, config.MODEL.FOCAL.WINDOW_SIZE, config.TRAIN.LAYER_DECAY) == (384, 12, 0.9)
    with caplog.at_level(logging.INFO, logger="focal.test"):
        load_pretrained(str(tmp_path / "released.pth"), build_model(config), LOG)
    assert LOAD_LINE.search(caplog.text).group(7, 8) == ("0", "none")  # left at initial values
