"""Behaviour beyond the fixtures: any input size, all gather methods equal, backbone outputs, checkpoint loading."""
import pytest
import torch

from config import load_config
from models import ConfigError, build_model, load_weights
from models.focal_attention import GATHER_METHODS, FocalWindowAttention
from models import window_attention
from models.window_attention import attend

SMALL = ["MODEL.NUM_CLASSES", 10, "MODEL.DROP_PATH_RATE", 0.0, "MODEL.FOCAL.EMBED_DIM", 16,
         "MODEL.FOCAL.DEPTHS", [2, 2, 2, 2], "MODEL.FOCAL.NUM_HEADS", [2, 2, 4, 8],
         "MODEL.FOCAL.FOCAL_POOL", "fc", "MODEL.FOCAL.FOCAL_LEVELS", [2, 2, 2, 2]]


def small_model(*opts, model_type="focal"):
    torch.manual_seed(0)
    return build_model(load_config(opts=SMALL + ["MODEL.TYPE", model_type] + list(opts)))


def randomise(model):
    """Training-like weights: the zero-initialised bias tables would hide position-dependent mistakes."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("opts", [
    (),
    ("MODEL.FOCAL.USE_SHIFT", True),
    ("MODEL.FOCAL.FOCAL_POOL", "conv", "MODEL.FOCAL.FOCAL_LEVELS", [3, 3, 2, 1]),
    ("MODEL.FOCAL.FOCAL_POOL", "mean", "MODEL.FOCAL.EXPAND_LAYER", "even", "MODEL.FOCAL.USE_SHIFT", True),
    ("MODEL.FOCAL.FOCAL_POOL", "max", "MODEL.FOCAL.FOCAL_LEVELS", [4, 3, 2, 2], "MODEL.FOCAL.EXPAND_SIZES", [2, 1, 3, 0]),
], ids=["fc", "shift", "conv-3levels", "mean-even-shift", "max-4levels"])
@pytest.mark.parametrize("size", [(224, 224), (100, 60), (36, 52)])
def test_gather_methods_agree_at_any_size(opts, size):
    model = randomise(small_model(*opts)).eval()
    attns = [m for m in model.modules() if isinstance(m, FocalWindowAttention)]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    outputs = []
    for method in GATHER_METHODS:
        for attn in attns:
            attn.kv_gather = method
        with torch.no_grad():
            outputs.append(model(x))
    for method, out in zip(GATHER_METHODS[1:], outputs[1:]):
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"{method}: {m}")


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
    model = small_model("MODEL.FOCAL.USE_CONV_EMBED", model_type == "focalv2", model_type=model_type).eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(torch.randn(1, 3, *size))
    assert len(feats) == 4
    for i, feat in enumerate(feats):
        stride = 4 * 2 ** i
        assert feat.shape == (1, 16 * 2 ** i, -(-size[0] // stride), -(-size[1] // stride))
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


def test_absolute_position_embedding_follows_input_size():
    model = small_model("MODEL.FOCAL.APE", True, "MODEL.FOCAL.USE_LAYERSCALE", True, "MODEL.FOCAL.USE_PRE_NORM", True)
    names = {n for n, _ in model.named_parameters()}
    assert {"absolute_pos_embed", "layers.0.blocks.0.gamma_1", "layers.0.downsample.pre_norm.weight"} <= names
    assert model(torch.randn(1, 3, 96, 160)).shape == (1, 10)


def test_no_weight_decay_names_cover_position_tables():
    model = small_model()
    keywords = model.no_weight_decay_keywords()
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and all(any(k in n for k in keywords) for n in tables)
    assert model.no_weight_decay() == {"absolute_pos_embed"}


@pytest.mark.parametrize("opts,key", [
    (["MODEL.FOCAL.NUM_HEADS", [2, 2, 4]], "MODEL.FOCAL.NUM_HEADS"),
    (["MODEL.FOCAL.NUM_HEADS", [3, 2, 4, 8]], "MODEL.FOCAL.NUM_HEADS"),
    (["MODEL.FOCAL.FOCAL_POOL", "avg"], "MODEL.FOCAL.FOCAL_POOL"),
    (["MODEL.FOCAL.EXPAND_SIZES", [7, 3, 3, 3]], "MODEL.FOCAL.EXPAND_SIZES"),
    (["MODEL.FOCAL.FOCAL_WINDOWS", [6, 5, 3, 1]], "MODEL.FOCAL.FOCAL_WINDOWS"),
    (["MODEL.FOCAL.KV_GATHER", "loop"], "MODEL.FOCAL.KV_GATHER"),
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


def test_compiles_as_one_graph_and_matches_eager():
    model = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], "MODEL.FOCAL.USE_SHIFT", True)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_trains_after_inference_mode_at_the_same_size(model_type):
    model = small_model(model_type=model_type)
    x = torch.randn(1, 3, 52, 76)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_training_attention_path_computes_the_inference_result(model_type):
    """With gradients on, attention runs through a custom backward; its forward must stay the fused result."""
    model = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type)).train()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fused = model(x)
    plain = model(x)
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=1e-5)


# bytes per attention block -> blocks per image: 0 turns blocking off; 1 gives one window of one head per block
BLOCKINGS = {"one block": 0, "one window": 1, "two heads": 5 * 7 * 8 * 2 * 2, "one image": 5 * 7 * 8 * 2 * 3}


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_attention_gradients_are_exact(monkeypatch, gathered, blocking):
    """The custom backward in float64, whole and in blocks of windows or heads."""
    monkeypatch.setattr(window_attention, "CPU_BLOCK_BYTES", BLOCKINGS[blocking])
    gen = torch.Generator().manual_seed(0)
    batch, heads, windows, n_query, n_keys, tokens, hd = 2, 3, 2, 5, 7, 9, 4
    q = torch.randn(batch, heads * windows, n_query, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, heads * windows, n_query, n_keys, generator=gen, dtype=torch.float64, requires_grad=True)
    if gathered:  # with repeated tokens, so the gradient scatter must accumulate
        index = torch.randint(0, tokens, (windows, n_keys), generator=gen)
        kv = torch.randn(2, batch, heads, tokens, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    else:
        index = None
        kv = torch.randn(2, batch, heads, windows * n_keys, hd, generator=gen, dtype=torch.float64,
                         requires_grad=True)
    n_blocks = {"one block": 1, "one window": batch * heads * windows, "two heads": batch * 2, "one image": batch}
    assert len(window_attention.attention_blocks(q, heads, n_keys)) == n_blocks[blocking]
    assert torch.autograd.gradcheck(lambda q, kv, bias: attend(q, kv, index, bias, scale=0.5, dropout=0.0),
                                    (q, kv, bias))


def test_blocked_attention_equals_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4 * 6, 49, 8, generator=gen)
    kv = torch.randn(2, 3, 4, 100, 8, generator=gen)
    index = torch.randint(0, 100, (6, 60), generator=gen)
    bias = torch.randn(1, 4 * 6, 49, 60, generator=gen)
    whole = attend(q, kv, index, bias, scale=0.3, dropout=0.0)
    per_window = 49 * 60 * 4
    # 4 windows of one head, 2 heads of one image, 2 images per block
    for block_bytes, n_blocks in ((per_window * 4, 3 * 4 * 2), (per_window * 6 * 2, 3 * 2), (per_window * 24 * 2, 2)):
        monkeypatch.setattr(window_attention, "CPU_BLOCK_BYTES", block_bytes)
        assert len(window_attention.attention_blocks(q, 4, 60)) == n_blocks
        torch.testing.assert_close(attend(q, kv, index, bias, scale=0.3, dropout=0.0), whole, atol=1e-6, rtol=0)


def gradients(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_training_in_blocks_of_windows_equals_one_block(monkeypatch, model_type):
    model = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type)).train()
    x = torch.randn(2, 3, 100, 60, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(window_attention, "CPU_BLOCK_BYTES", 0)
    want_out, want = gradients(model, x)
    monkeypatch.setattr(window_attention, "CPU_BLOCK_BYTES", 1)  # one window of one head per block
    out, got = gradients(model, x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_compiled_training_step_matches_eager(model_type):
    """The custom attention backward also runs inside a compiled graph (one block there)."""
    model = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], model_type=model_type)).train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    want_out, want = gradients(model, x)
    out, got = gradients(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
