"""The inference cache of attention biases (models/kernels): reused only while the layout and the attention
module's parameters and buffers are unchanged."""
import pytest
import torch

from models.focal_attention import FocalWindowAttention
from models.kernels import cpu_attention, optimize_for
from models.topk_attention import TopKFocalAttention
from tests.helpers import randomise, small_model

BUILDERS = {"focal": FocalWindowAttention, "focalv2": TopKFocalAttention}


@pytest.fixture(params=sorted(BUILDERS))
def counted(request, monkeypatch):
    """A small randomised model of each variant and a list that grows by one per bias actually built."""
    cls = BUILDERS[request.param]
    builds = []
    original = cls.attention_bias

    def counting(self, *args):
        builds.append(self)
        return original(self, *args)
    monkeypatch.setattr(cls, "attention_bias", counting)
    model = randomise(small_model(model_type=request.param)).eval()
    optimize_for(model, "cpu", ["bias_cache"])
    return model, builds


def bias_tables(model):
    return [p for name, p in model.named_parameters() if "relative_position" in name or "coord2rpb" in name]


def fresh(model, x):
    """The output with the cache off."""
    saved = cpu_attention.BIAS_CACHE_BYTES
    cpu_attention.BIAS_CACHE_BYTES = 0
    try:
        with torch.no_grad():
            return model(x)
    finally:
        cpu_attention.BIAS_CACHE_BYTES = saved


def test_second_call_reuses_every_bias(counted):
    model, builds = counted
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        first = model(x)
        n_blocks = len(builds)
        second = model(x)
    assert n_blocks > 0 and len(builds) == n_blocks
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_changed_parameters_rebuild_the_bias(counted):
    model, builds = counted
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        n_blocks = len(builds)
        for p in bias_tables(model):
            p.add_(0.5)  # what an optimizer step does: in place, so only the version counter tells
        changed = model(x)
    assert len(builds) == 2 * n_blocks
    torch.testing.assert_close(changed, fresh(model, x), rtol=0, atol=0)

    state = {k: v + 0.25 if "relative_position" in k or "coord2rpb" in k else v
             for k, v in model.state_dict().items()}
    for assign in (False, True):  # copied into the parameters, or replacing them
        model.load_state_dict(state, assign=assign)
        with torch.no_grad():
            loaded = model(x)
        torch.testing.assert_close(loaded, fresh(model, x), rtol=0, atol=0)
        assert not torch.equal(loaded, changed)
        state = {k: v + 0.25 if "relative_position" in k or "coord2rpb" in k else v for k, v in state.items()}


def test_another_input_size_rebuilds(counted):
    model, builds = counted
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        n_blocks = len(builds)
        out = model(x)
    # the early stages change layout; the last ones are padded to one window at both sizes and keep theirs
    assert n_blocks < len(builds) < 2 * n_blocks
    torch.testing.assert_close(out, fresh(model, x), rtol=0, atol=0)


def test_not_used_while_autograd_records_or_over_the_size_limit(counted, monkeypatch):
    model, builds = counted
    x = torch.randn(1, 3, 64, 64)
    model(x)
    model(x).sum().backward()  # grad mode: every call builds, so gradients reach the bias tables
    n_blocks = len(builds) // 2
    assert n_blocks > 0 and all(p.grad is not None for p in bias_tables(model))

    monkeypatch.setattr(cpu_attention, "BIAS_CACHE_BYTES", 16)
    with torch.no_grad():
        model(x)
        model(x)
    assert len(builds) == 4 * n_blocks


def test_kept_biases_of_all_modules_stay_within_the_budget(counted, monkeypatch):
    """A budget for about half the biases: those built first are kept and reused, the others rebuilt on every
    call, and the bytes kept never exceed the budget."""
    model, builds = counted
    x = torch.randn(1, 3, 64, 64)
    monkeypatch.setattr(cpu_attention, "BIAS_CACHE_BYTES", 1 << 40)
    with torch.no_grad():
        model(x)
    everything = cpu_attention.kept_bias_bytes()
    n_blocks = len(builds)
    optimize_for(model, "cpu", ["bias_cache"])  # forgets every kept bias
    assert cpu_attention.kept_bias_bytes() == 0
    monkeypatch.setattr(cpu_attention, "BIAS_CACHE_BYTES", everything // 2)
    with torch.no_grad():
        first = model(x)
        kept = cpu_attention.kept_bias_bytes()
        built = len(builds)
        second = model(x)
    rebuilt = len(builds) - built
    assert built == 2 * n_blocks and 0 < kept <= everything // 2 and cpu_attention.kept_bias_bytes() == kept
    assert 0 < rebuilt < n_blocks  # some biases were reused, not all
    torch.testing.assert_close(second, first, rtol=0, atol=0)
