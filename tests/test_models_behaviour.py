"""Behaviour beyond the fixtures: any input size, all gather methods equal, backbone outputs, checkpoint loading,
and the timm registrations (the nine released names build the configs' models, load released-layout checkpoints
and serve as feature backbones)."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import load_config
from models import ConfigError, build_model, extract_state_dict, load_weights
from models.registry import RELEASE_URL
from tests.helpers import (GOLDEN, REPO, SMALL, assert_agree, assert_outputs_and_gradients_agree, longest_sum,
                           outputs_and_gradients, randomise, relative_error, roundoff, small_model, sum_roundoff,
                           tiny_config)
from tests.oracles import GATHERS, oracle_gather
from tools.golden import FIXTURES, case_input, load_case


@pytest.mark.parametrize("opts", [
    (),
    ("MODEL.FOCAL.USE_SHIFT", True),
    ("MODEL.FOCAL.FOCAL_POOL", "conv", "MODEL.FOCAL.FOCAL_LEVELS", [3, 3, 2, 1]),
    ("MODEL.FOCAL.FOCAL_POOL", "mean", "MODEL.FOCAL.EXPAND_LAYER", "even", "MODEL.FOCAL.USE_SHIFT", True),
    ("MODEL.FOCAL.FOCAL_POOL", "max", "MODEL.FOCAL.FOCAL_LEVELS", [4, 3, 2, 2],
     "MODEL.FOCAL.EXPAND_SIZES", [2, 1, 3, 0]),
], ids=["fc", "shift", "conv-3levels", "mean-even-shift", "max-4levels"])
@pytest.mark.parametrize("size", [(224, 224), (100, 60), (36, 52)])
def test_layout_index_agrees_with_roll_and_unfold_oracles_at_any_size(opts, size):
    model = randomise(small_model(*opts)).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    bound = 2 * roundoff(model, torch.float32, dot=longest_sum(model, x))  # the same keys, maybe in another layout
    for method in GATHERS:
        with oracle_gather(model, method), torch.no_grad():
            got = model(x)
        assert_agree(got, want, bound, method)  # measured: equal bit for bit (AMD EPYC)


@pytest.mark.parametrize("model_type,shift", [("focal", False), ("focal", True), ("focalv2", False), ("focalv2", True)])
@pytest.mark.parametrize("size", [(320, 480), (100, 60), (50, 74)])
def test_any_input_size_trains(model_type, shift, size):
    model = small_model("MODEL.FOCAL.USE_SHIFT", shift, "MODEL.FOCAL.USE_CONV_EMBED", model_type == "focalv2",
                        model_type=model_type).train()
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
@pytest.mark.parametrize("size", [(224, 224), (320, 480), (100, 60)])
def test_forward_intermediates_are_stride_4_to_32_maps(model_type, size):
    overlapping = model_type == "focalv2"
    model = small_model("MODEL.FOCAL.USE_CONV_EMBED", overlapping, model_type=model_type).eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(torch.randn(1, 3, *size))
    assert len(feats) == 4
    sides = [-(-s // 4) for s in size]  # the stem pads images to whole patches
    for i, feat in enumerate(feats):
        assert feat.shape == (1, 16 * 2 ** i, *sides)
        # the reference's downsampling: 2x2 merging drops an odd last row/column, the overlapping 3x3 keeps it
        sides = [-(-s // 2) if overlapping else s // 2 for s in sides]
    assert final.shape == (1, feats[-1].shape[2], feats[-1].shape[3], 128)


def test_pooled_backbone_matches_classifier_path():
    model = randomise(small_model()).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, 128)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for use_checkpoint in (False, True):
        model = randomise(small_model("TRAIN.USE_CHECKPOINT", use_checkpoint)).train()
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def added_position_embedding(model, x):
    """What the model adds to the patch embeddings of ``x`` before the first stage, as a ``(1, H, W, C)`` map, and
    how far that may lie from what was meant to be added: it is recovered as (patches + embedding) - patches, the
    sum and the difference each rounded to float32 (half an eps of the largest sum each)."""
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model.eval()(x)
        patches = model.patch_embed(x)
    hook.remove()
    return seen[0] - patches, torch.finfo(torch.float32).eps * float(seen[0].abs().max())


def ape_model():
    """A 64x64 model (a 16x16 grid of patches) whose position embedding is random, token by token."""
    model = small_model("MODEL.FOCAL.APE", True, "DATA.IMG_SIZE", 64)
    with torch.no_grad():
        model.absolute_pos_embed.copy_(torch.randn(model.absolute_pos_embed.shape,
                                                   generator=torch.Generator().manual_seed(3)))
    return model


def test_absolute_position_embedding_is_added_token_by_token_at_the_configured_size():
    """Row-major: token ``i * 16 + j`` of the table goes to patch ``(i, j)``, for every image of the batch."""
    model = ape_model()
    added, rounding = added_position_embedding(model, torch.randn(2, 3, 64, 64))
    table = model.absolute_pos_embed.detach().view(1, 16, 16, -1)
    torch.testing.assert_close(added, table.expand(2, -1, -1, -1), atol=rounding, rtol=0)  # measured 0.36 of it
    assert (added.abs() > 0.1).float().mean() > 0.5  # not a table of zeros


@pytest.mark.parametrize("size", [(96, 160), (32, 48)], ids=["larger", "smaller"])
def test_absolute_position_embedding_is_resampled_bicubic_for_other_sizes(size):
    """At another input size the table is resampled (bicubic, corners not aligned) to the grid of patches, as
    timm resamples a ViT's; a constant table stays constant and a table varying by row only stays so."""
    from timm.layers import resample_abs_pos_embed
    model = ape_model()
    grid = (size[0] // 4, size[1] // 4)
    added, rounding = added_position_embedding(model, torch.randn(1, 3, *size))
    want = resample_abs_pos_embed(model.absolute_pos_embed.detach(), list(grid), [16, 16], num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=False)
    torch.testing.assert_close(added, want.view(1, *grid, -1), atol=rounding, rtol=0)  # measured 0.49 of it

    with torch.no_grad():
        rows = torch.arange(16.0).repeat_interleave(16)[None, :, None]  # token i * 16 + j -> i
        model.absolute_pos_embed.copy_(rows)
    by_row, rounding = added_position_embedding(model, torch.randn(1, 3, *size))
    # Same along a row, up to the rounding of two values: bicubic resampling sums 4 terms along each axis (relative
    # to the table's largest value, 15 here), then each is recovered from a sum (measured 0.41 of the bound).
    resampling = sum_roundoff(torch.float32, terms=4, steps=2)
    torch.testing.assert_close(by_row, by_row[:, :, :1].expand_as(by_row), atol=2 * (15 * resampling + rounding),
                               rtol=0)
    assert (by_row[0, 1:, 0, 0] > by_row[0, :-1, 0, 0]).all()  # and rising from row to row
    with torch.no_grad():
        model.absolute_pos_embed.fill_(0.75)
    constant, rounding = added_position_embedding(model, torch.randn(1, 3, *size))
    torch.testing.assert_close(constant, torch.full((1, *grid, model.embed_dim), 0.75),
                               atol=0.75 * resampling + rounding, rtol=0)


def test_absolute_position_embedding_loads_at_another_image_size():
    """A checkpoint's table resized to the new model's grid (timm pretrained loading at ``img_size=(96, 160)``,
    or main.py's ``load_weights`` at 96) as the forward resamples it for other inputs: the same embedding is
    added. Both refused it as a shape mismatch."""
    source = ape_model()
    x = torch.randn(1, 3, 96, 160)
    overlay = dict(state_dict=source.state_dict(), num_classes=10)
    model = timm.create_model("focal_tiny_patch4_window7_224", pretrained=True, pretrained_cfg_overlay=overlay,
                              img_size=(96, 160), ape=True, **small_case_kwargs())
    assert model.absolute_pos_embed.shape == (1, 24 * 40, 16)
    assert_same_embedding(added_position_embedding(model, x), added_position_embedding(source, x))
    square = small_model("MODEL.FOCAL.APE", True, "DATA.IMG_SIZE", 96)
    report = load_weights(square, source.state_dict())
    assert report.clean and "absolute_pos_embed" in report.resized
    x = torch.randn(1, 3, 96, 96)
    assert_same_embedding(added_position_embedding(square, x), added_position_embedding(source, x))


def assert_same_embedding(got, want):
    """Two recovered embeddings (:func:`added_position_embedding`) within the rounding of both (measured: equal)."""
    torch.testing.assert_close(got[0], want[0], atol=got[1] + want[1], rtol=0)


def test_channels_last_changes_the_layout_not_the_outputs():
    """--channels-last: the convolution weights (the conv patch embedding) in NHWC, the same logits."""
    torch.manual_seed(0)
    model = randomise(build_model(tiny_config("MODEL.FOCAL.USE_CONV_EMBED", True))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        nhwc = model.to(memory_format=torch.channels_last)
        assert nhwc.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
        assert_agree(nhwc(x), expected, 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))


def test_no_weight_decay_names_cover_position_tables():
    model = small_model()
    keywords = model.no_weight_decay_keywords()
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and all(any(k in n for k in keywords) for n in tables)
    assert model.no_weight_decay() == {"absolute_pos_embed", *tables}


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_timm_optimizer_skips_decay_where_the_training_recipe_does(layer_decay):
    """timm's ``create_optimizer_v2`` reads only ``no_weight_decay()`` (exact names; its swin lists its tables
    there), not the keywords: the position tables were decayed, unlike in main.py's optimizer."""
    from timm.optim import create_optimizer_v2

    from optimizer import no_decay_names
    model = small_model()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == set(no_decay_names(model))


@pytest.mark.parametrize("opts,key", [
    (["MODEL.FOCAL.NUM_HEADS", [2, 2, 4]], "MODEL.FOCAL.NUM_HEADS"),
    (["MODEL.FOCAL.NUM_HEADS", [3, 2, 4, 8]], "MODEL.FOCAL.NUM_HEADS"),
    (["MODEL.FOCAL.FOCAL_POOL", "avg"], "MODEL.FOCAL.FOCAL_POOL"),
    (["MODEL.FOCAL.EXPAND_SIZES", [7, 3, 3, 3]], "MODEL.FOCAL.EXPAND_SIZES"),
    (["MODEL.FOCAL.FOCAL_WINDOWS", [6, 5, 3, 1]], "MODEL.FOCAL.FOCAL_WINDOWS"),
    (["MODEL.FOCAL.USE_CONV_EMBED", True, "MODEL.FOCAL.PATCH_SIZE", 2, "DATA.IMG_SIZE", 112], "MODEL.FOCAL.PATCH_SIZE"),
    (["DATA.IMG_SIZE", 32, "MODEL.FOCAL.FOCAL_LEVELS", [3, 3, 3, 3]], "MODEL.FOCAL.FOCAL_LEVELS"),
    (["DATA.IMG_SIZE", 226], "DATA.IMG_SIZE"),
    (["MODEL.TYPE", "swin"], "MODEL.TYPE"),
    (["MODEL.TYPE", "focalv2", "MODEL.FOCAL.FOCAL_LEVELS", [3, 2, 2, 2]], "MODEL.FOCAL.FOCAL_LEVELS"),
    (["MODEL.TYPE", "focalv2", "MODEL.FOCAL.FOCAL_POOL", "none"], "MODEL.FOCAL.FOCAL_POOL"),
])
def test_inconsistent_model_settings_name_the_key(opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(load_config(opts=SMALL + opts))


def test_checkpoint_of_another_model_gets_short_summary():
    source = small_model("MODEL.FOCAL.EMBED_DIM", 32)
    target = small_model("MODEL.NUM_CLASSES", 5)
    with pytest.raises(ValueError) as err:
        load_weights(target, {"model": source.state_dict()})
    message = str(err.value)
    assert "mismatched shapes for" in message and "in all)" in message
    assert len(message) < 800


def test_wrapped_checkpoint_keys_and_new_window_size_load():
    source = randomise(small_model())
    wrapped = {"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    same = small_model()
    assert load_weights(same, wrapped).clean
    torch.testing.assert_close(same.state_dict(), source.state_dict())

    wider = small_model("MODEL.FOCAL.WINDOW_SIZE", 8, "MODEL.FOCAL.FOCAL_POOL", "mean", "MODEL.NUM_CLASSES", 3)
    report = load_weights(wider, wrapped, strict=False, drop_mismatched_head=True)
    assert any(n.endswith("attn.relative_position_bias_table") for n in report.resized)
    assert "head.weight" in report.missing
    assert wider.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 2)


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_bf16_autocast_training_step(model_type):
    model = small_model(model_type=model_type).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 96, 128))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_model_cast_to_another_dtype_runs_in_it(model_type, dtype):
    """``model.to(torch.bfloat16)`` (no autocast) or ``.double()``: focalv2's top-k position MLPs met their float32
    coordinates (a dtype error). The outputs agree within the rounding of the less precise of the two runs
    (``roundoff``): bfloat16's, whose matmuls sum in float32 on every CPU path (13 layers x 2 x 2^-8 = 0.10;
    measured at most 0.035 over 3 seeds x ATen's default/AVX2/AVX512 kernels x oneDNN on/off, AMD EPYC), or float32's
    with its sums over up to 512 terms (the widest MLP) for float64 (3.5e-5; measured 1.2e-6)."""
    model = randomise(small_model("MODEL.FOCAL.USE_CONV_EMBED", model_type == "focalv2", model_type=model_type))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.eval()(x)
        got = model.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    bound = roundoff(model, torch.bfloat16) if dtype == torch.bfloat16 else roundoff(model, torch.float32, dot=512)
    assert relative_error(got, want) <= bound


@pytest.mark.slow
def test_compiles_as_one_graph_and_matches_eager():
    model = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], "MODEL.FOCAL.USE_SHIFT", True)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert_agree(compiled, eager, 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))


@pytest.mark.slow
def test_compiled_with_dynamic_shapes_matches_eager_at_two_sizes():
    """Compiled with a symbolic image height and width (the sizes a multi-size detection run varies; ``mark_dynamic``
    keeps the batch static, which halves the tracing time of ``dynamic=True``), then called at a second size that
    needs padding, the model computes the eager outputs at both. It is not one graph (the cached layout builder
    takes concrete sizes: each attention call breaks the graph), and tracing with symbolic sizes is slow, hence one
    stage of one shifted block, traced by AOTAutograd and run eagerly (``aot_eager``) as the compiled training
    step below; Inductor compiles the static graph above."""
    torch.compiler.reset()
    model = randomise(small_model("MODEL.FOCAL.DEPTHS", [1], "MODEL.FOCAL.NUM_HEADS", [2], "MODEL.FOCAL.FOCAL_LEVELS",
                                  [2], "MODEL.FOCAL.EXPAND_SIZES", [3], "MODEL.FOCAL.FOCAL_WINDOWS", [3],
                                  "MODEL.FOCAL.FOCAL_STAGES", [0], "MODEL.FOCAL.USE_SHIFT", True)).eval()
    compiled = torch.compile(model, backend="aot_eager")
    for size in [(64, 96), (100, 60)]:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        torch._dynamo.mark_dynamic(x, (2, 3))
        with torch.no_grad():
            assert_agree(compiled(x), model(x), 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))
    torch.compiler.reset()


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_trains_after_inference_mode_at_the_same_size(model_type):
    model = small_model(model_type=model_type)
    x = torch.randn(1, 3, 52, 76)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
@pytest.mark.slow
def test_compiled_training_step_matches_eager(model_type):
    """A compiled training step (PyTorch's attention backward in the graph) computes the eager one. The graph
    (one, no breaks) and its backward are ours to get right, so this runs AOTAutograd's graph eagerly
    (``aot_eager``); Inductor's code generation is covered at inference below, and compiling a backward with it
    takes minutes on 2 cores with a cold cache."""
    model = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], model_type=model_type)).train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    want = outputs_and_gradients(model, x)
    assert_outputs_and_gradients_agree(outputs_and_gradients(torch.compile(model, fullgraph=True, backend="aot_eager"),
                                                            x), want, model, x)


# timm registrations (models/registry.py)
RELEASED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
FIXTURE = FIXTURES / "small_fc_224.pth"


def small_case_kwargs() -> dict:
    """The fixture's architecture as ``create_model`` keyword overrides (config keys are the kwargs, upper-cased)."""
    case = load_case(FIXTURES / "small_fc_224.json")
    return dict({k.lower(): v for k, v in case["focal"].items()}, num_classes=case["num_classes"],
                drop_path_rate=0.0)


def from_fixture(**kwargs) -> torch.nn.Module:
    """Focal-T's registration with the fixture's sizes, loading the fixture file the way timm loads releases."""
    overlay = dict(file=str(FIXTURE), num_classes=10)
    return timm.create_model("focal_tiny_patch4_window7_224", pretrained=True, pretrained_cfg_overlay=overlay,
                             **dict(small_case_kwargs(), **kwargs)).eval()


def test_nine_released_names_registered_with_release_configs():
    assert len(RELEASED) == 9
    assert set(RELEASED) <= set(timm.list_models("focal*"))
    for name in RELEASED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == RELEASE_URL + name.replace("_patch4_window7_224", "-is224-ws7.pth").replace("_", "-")
        assert (cfg.input_size, cfg.interpolation, cfg.crop_pct, cfg.num_classes) == ((3, 224, 224), "bicubic",
                                                                                      0.875, 1000)
        assert (cfg.mean, cfg.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        assert not cfg.hf_hub_id


@pytest.mark.parametrize("name", RELEASED)
def test_create_model_builds_the_config_model(name):
    with torch.device("meta"):  # structure only: no weights to initialise
        ours = build_model(load_config(str(REPO / "configs" / f"{name}.yaml")))
        theirs = timm.create_model(name)
    assert [(n, p.shape) for n, p in theirs.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    assert str(theirs) == str(ours)  # every module setting, drop-path rates included


def test_pretrained_filter_unwraps_reference_layout_and_prefixes(tmp_path):
    """The fixture file as released (reference layout), and wrapped in DDP/compile prefixes, as a file or a state
    dict: each reproduces the fixture's logits (and so ``from_fixture``, which the tests below compare with)."""
    case = load_case(FIXTURES / "small_fc_224.json")
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in checkpoint["model"].items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "w.pth")
    for overlay in (dict(file=str(FIXTURE)), dict(state_dict=wrapped), dict(file=str(tmp_path / "w.pth"))):
        model = timm.create_model("focal_tiny_patch4_window7_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(overlay, num_classes=10), **small_case_kwargs()).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(case_input(case)), torch.tensor(case["output"]), **GOLDEN)


def test_pretrained_with_other_class_count_keeps_backbone_and_resets_head():
    reference = from_fixture()
    model = from_fixture(num_classes=3)
    assert model.head.out_features == 3
    for name, value in reference.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_pretrained_at_another_image_size_derives_the_tables_fine_tuning_derives():
    """``create_model(..., pretrained=True, img_size=288)``: the last stage's 9x9 map outgrows the 7x7 window, so
    its blocks gain neighbour tables the 224 checkpoint lacks; timm's loading failed on them as missing keys. They
    are derived as main.py's fine-tuning start derives them (``load_weights(drop_mismatched_head=True)``)."""
    model = from_fixture(img_size=288)
    expected = timm.create_model("focal_tiny_patch4_window7_224", img_size=288, **small_case_kwargs())
    report = load_weights(expected, torch.load(FIXTURE, map_location="cpu", weights_only=True), strict=False,
                          drop_mismatched_head=True)
    assert report.clean and any(n.startswith("layers.3.") for n in report.derived)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_reset_classifier_keeps_the_model_dtype():
    """A model already cast (``.double()``, ``.to(torch.bfloat16)``, or moved to a GPU) then given a new head:
    the head was created as float32 on the CPU, so the forward failed; timm's swin makes it like the model."""
    torch.manual_seed(0)
    model = timm.create_model("focal_tiny_patch4_window7_224", **SMALL_V1).double().eval()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 5)


def test_pretrained_at_a_smaller_image_size_leaves_out_the_tables_it_has_no_use_for():
    """``img_size=96``: stage 2's 6x6 map fits in one window, so its blocks attend to no surroundings and have no
    neighbour tables; timm's strict loading failed on the checkpoint's as unexpected keys. Everything else loads."""
    model = from_fixture(img_size=96)
    released = extract_state_dict(torch.load(FIXTURE, map_location="cpu", weights_only=True))
    left_out = [n for n in released if n.endswith("to_neighbors") and n not in model.state_dict()]
    assert left_out and all(n.startswith("layers.2.") for n in left_out)
    assert model.layers[2].blocks[0].window_size == 6
    for name, value in model.state_dict().items():
        if name.startswith(("layers.0.", "layers.1.")):
            torch.testing.assert_close(value, released[name], atol=0, rtol=0, msg=name)


def test_img_size_may_be_height_and_width():
    """timm's ``img_size=(H, W)`` (its swin takes either form) was a TypeError: a pair configures each stage's
    map from both sides; a square pair builds what the int builds."""
    name = "focal_tiny_patch4_window7_224"
    with torch.device("meta"):
        assert str(timm.create_model(name, img_size=(224, 224))) == str(timm.create_model(name, img_size=224))
    model = timm.create_model(name, img_size=(96, 160), ape=True, **SMALL_V1).eval()
    assert [stage.resolution for stage in model.layers] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert model.absolute_pos_embed.shape == (1, 24 * 40, 16)
    assert [block.window_size for block in model.layers[3].blocks] == [3]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 160)).shape == (1, 1000)


# Released structure (conv stem for focalv2, two pooled levels, window 7) at small widths and depths.
SMALL_V1 = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8))


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
@pytest.mark.parametrize("size", [(224, 224), pytest.param((800, 1216), marks=pytest.mark.slow)])
def test_features_only_is_forward_intermediates_with_feature_info(name, size):
    """timm's feature wrapper returns the model's own intermediates, all or those of ``out_indices``."""
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True, **SMALL_V1).eval()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [16, 32, 64, 128]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = backbone(x)
        final, inter = backbone.model.forward_intermediates(x)
        picked = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL_V1).eval()
        picked.load_state_dict(backbone.state_dict())
        odd = picked(x)
    assert len(feats) == 4 and final.shape[-1] == 128  # map sizes: test_forward_intermediates_are_stride_4_to_32_maps
    for got, expected in zip(inter, feats):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert picked.feature_info.reduction() == [8, 32]
    for got, expected in zip(odd, [feats[1], feats[3]]):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
def test_backbones_carry_only_the_stages_they_use(name):
    torch.manual_seed(0)
    full = timm.create_model(name, **SMALL_V1).eval()
    backbone = timm.create_model(name, features_only=True, out_indices=(0, 1), **SMALL_V1).eval()
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    names = [n for n, _ in backbone.model.named_parameters()]
    assert not [n for n in names if n.startswith(("norm.", "head.", "layers.2", "layers.3", "layers.1.downsample"))]
    assert names == [n for n in names if n in dict(full.named_parameters())]
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        got = backbone(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_pruned_model_still_classifies_its_last_kept_stage():
    """``prune_intermediate_layers(indices, prune_head=False)`` (timm's swin: the head, sized for the dropped final
    features, goes anyway): ``num_features`` follows the last kept stage and ``forward`` pools it, where the kept
    1000-class head met 32 channels (a shape error)."""
    torch.manual_seed(0)
    model = timm.create_model("focal_tiny_patch4_window7_224", **SMALL_V1).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)[0]
        want = want.mean(dim=(1, 2))
        assert model.prune_intermediate_layers(indices=(0, 1), prune_head=False) == [0, 1]
        assert model.num_features == 32 and model.num_classes == 0
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_pretrained_backbone_loads_released_layout():
    backbone = timm.create_model("focal_tiny_patch4_window7_224", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(FIXTURE), num_classes=10),
                                 **small_case_kwargs()).eval()
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        want = from_fixture().forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_global_pool_option_as_in_timm():
    """timm's classifier API: ``create_model(..., global_pool='')`` and ``reset_classifier(0, '')`` give the
    unpooled normalised map (what timm's own swin gives), ``'avg'`` the pooled features; both were a TypeError."""
    torch.manual_seed(0)
    model = timm.create_model("focal_tiny_patch4_window7_224", **SMALL_V1).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final = model.forward_features(x)
        logits = model(x)
        model.reset_classifier(0, "")
        assert model.global_pool == "" and model.num_classes == 0
        torch.testing.assert_close(model(x), final, atol=0, rtol=0)
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), final.mean(dim=(1, 2)), atol=0, rtol=0)
        unpooled = timm.create_model("focal_tiny_patch4_window7_224", num_classes=0, global_pool="", **SMALL_V1)
        unpooled.load_state_dict(model.state_dict())
        torch.testing.assert_close(unpooled.eval()(x), final, atol=0, rtol=0)
    assert logits.shape == (2, 1000)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")
