"""The benchmark CLI on small models: speed tables whose ratios are those of the timed figures (to the peer, and
of a +kernels model to its plain self), memory probes, JSON, per-layer kernel mode, the ceiling's
ablations and autocast."""
import json
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tools import benchmark

PEER = "configs/demo/focal_demo.yaml"
MODEL = "configs/demo/focalv2_demo.yaml"
DEMO = ["--models", MODEL, "--peer", PEER, "--img-size", "64", "--batch-size", "2", "--reps", "2",
        "--min-seconds", "0.01"]
CELL = re.compile(r"^([\d.]+) \(([\d.]+)x(?:, ([\d.]+)x of (\S+))?\)$")


def run(*args: str) -> str:
    """The benchmark as a subprocess (needed for its memory probes and --baseline imports)."""
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_here(capsys, *args: str) -> str:
    benchmark.main(list(args))
    return capsys.readouterr().out


def table(out: str, title: str) -> dict:
    """``{first cell: [other cells]}`` of the markdown table printed under the line starting with ``title``."""
    lines = out.split("\n" + title, 1)[1].split("\n\n")[0].strip().splitlines()
    assert lines[2].startswith("|--"), lines
    body = lines[3:]
    body = body[:next((i for i, line in enumerate(body) if not line.startswith("|")), len(body))]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    return {row[0]: row[1:] for row in cells}


def check_speed_table(out: str, figures: dict, keys: list) -> None:
    """One row per timed model, the peer included; each cell prints the model's images/s from the JSON and its
    ratio to the peer's (and, for NAME+kernels, to NAME's) at the same setting."""
    rows = table(out, "images/s, medians")
    assert set(rows) == set(figures) and PEER in rows
    for name, cells in rows.items():
        assert len(cells) == len(keys)
        for key, cell in zip(keys, cells):
            ips, ratio, gain, base = CELL.match(cell).groups()
            value = figures[name][key]
            assert value > 0 and ips == f"{value:.2f}"
            assert ratio == f"{value / figures[PEER][key]:.2f}", (name, key, cell)
            plain = name[:-len("+kernels")] if name.endswith("+kernels") else None
            assert base == (plain and plain.split(":")[-1])
            if plain:
                assert gain == f"{value / figures[plain][key]:.2f}", (name, key, cell)


def ratio_bounds(num: str, den: str) -> tuple:
    """The range of ``num / den`` for values printed with their decimals (half a unit of the last digit each)."""
    half = lambda s: 0.5 * 10 ** -len(s.split(".")[1]) if "." in s else 0.5  # noqa: E731
    return (float(num) - half(num)) / (float(den) + half(den)), (float(num) + half(num)) / (float(den) - half(den))


def assert_printed_ratio(ratio: str, num: str, den: str) -> None:
    low, high = ratio_bounds(num, den)
    assert low - 0.005 <= float(ratio.rstrip("x")) <= high + 0.005, (ratio, num, den)


@pytest.mark.slow
def test_speed_and_memory_tables_with_ratios_to_the_peer(tmp_path):
    out = run(*DEMO, "--mode", "both", "--json", str(tmp_path / "bench.json"))
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert set(figures) == {MODEL, PEER}
    check_speed_table(out, figures, ["infer_64", "train_64"])
    memory = table(out, "training-step memory")
    assert list(memory) == [PEER, MODEL]  # the peer first
    for name, (mb, ratio) in memory.items():
        peak = figures[name]["train_peak_mb_64"]
        assert peak > 100 and mb == f"{peak:.0f}"
        assert ratio == f"{peak / figures[PEER]['train_peak_mb_64']:.2f}x"


def test_sizes_mode_gives_ratios_to_the_peer_and_first_over_cached_calls(capsys, tmp_path):
    out = run_here(capsys, "--models", MODEL, "--peer", PEER, "--sizes", "64", "48x80", "--reps", "2",
                   "--min-seconds", "0.01", "--json", str(tmp_path / "sizes.json"))
    figures = json.loads((tmp_path / "sizes.json").read_text())
    lines = out.split("\ninference per input size, batch 1", 1)[1].strip().splitlines()[3:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert [(r[0], r[1]) for r in rows] == [(s, m) for s in ("64x64", "48x80") for m in (MODEL, PEER)]
    for size, name, ips, ratio, cached, first, first_over_cached in rows:
        f = figures[name]
        assert ips == f"{f[f'infer_{size}']:.2f}" and cached == f"{f[f'cached_call_s_{size}']:.3f}"
        assert first == f"{f[f'first_call_s_{size}']:.3f}" and f[f"first_call_s_{size}"] > 0
        assert ratio == f"{f[f'infer_{size}'] / figures[PEER][f'infer_{size}']:.2f}x"
        assert first_over_cached == f"{f[f'first_call_s_{size}'] / f[f'cached_call_s_{size}']:.2f}x"


def test_sizes_mode_times_a_new_size_with_an_empty_layout_cache(monkeypatch):
    """The first-call step rebuilds every layout of the model; the cached step rebuilds none."""
    built = []
    original = benchmark.LAYOUTS.get

    def counting(key, build):
        return original(key, lambda: built.append(key) or build())
    monkeypatch.setattr(benchmark.LAYOUTS, "get", counting)
    model = benchmark.create(MODEL, None)
    x = torch.randn(1, 3, 64, 64)
    cached, first = benchmark.inference_step(model, x), benchmark.first_call_step(model, x, "none")
    cached()
    n_layouts = len(built)
    cached()
    assert n_layouts > 0 and len(built) == n_layouts
    first()
    assert len(built) == 2 * n_layouts


@pytest.mark.parametrize("size", ["12", "64x", "axb", "64x64x3"])
def test_sizes_mode_refuses_a_bad_size_naming_the_flag(size, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sizes", size])
    assert "--sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_mode_times_compiled_models(tmp_path):
    # aot_eager: the compiled path of the benchmark without Inductor's C++ build (a minute or more with a cold
    # cache on 2 cores; test_models_behaviour compiles with Inductor)
    out = run(*DEMO, "--mode", "infer", "--compile", "aot_eager", "--no-memory", "--json", str(tmp_path / "bench.json"))
    assert "timing infer under torch.compile (aot_eager)" in out
    check_speed_table(out, json.loads((tmp_path / "bench.json").read_text()), ["infer_64"])


def test_kernels_suffix_gives_the_gain_over_the_plain_model(capsys, tmp_path):
    out = run_here(capsys, *DEMO, "--mode", "infer", "--no-memory", "--models", MODEL, MODEL + "+kernels",
                   "--json", str(tmp_path / "bench.json"))
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert set(figures) == {MODEL, MODEL + "+kernels", PEER}
    check_speed_table(out, figures, ["infer_64"])
    assert "kernels on cpu: attention, bias_cache" in out


@pytest.mark.slow
def test_before_and_after_against_another_checkout(tmp_path):
    out = run(*DEMO, "--mode", "infer", "--no-memory", "--baseline", str(REPO), "--models", "base:" + MODEL, MODEL,
              "--json", str(tmp_path / "bench.json"))
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert set(figures) == {"base:" + MODEL, MODEL, PEER}
    check_speed_table(out, figures, ["infer_64"])


def test_suffixes_apply_the_device_kernels():
    from models.kernels.cpu_attention import CpuKernels
    from models.kernels.onednn_linear import OneDnnLinear
    plain = benchmark.create(PEER, 64)
    assert not any(isinstance(m, (CpuKernels, OneDnnLinear)) for m in plain.modules())
    fast = benchmark.create(PEER + "+kernels", 64)
    assert any(isinstance(m, CpuKernels) for m in fast.modules())
    swin = benchmark.create("timm:swin_tiny_patch4_window7_224+onednn", 224)
    assert any(isinstance(m, OneDnnLinear) for m in swin.modules())


def test_kernels_mode_compares_linear_kernels_per_layer(capsys):
    out = run_here(capsys, "--kernels", "--img-size", "32", "--batch-size", "1", "--reps", "1",
                   "--min-seconds", "0.001")
    rows = table(out, "linear layers at 32px")
    assert len(rows) == 16 and rows["stage 1 qkv"][0] == "64x96 -> 288" and rows["stage 4 fc2"][0] == "1x3072 -> 768"
    for shape, stock, onednn, speed_up in rows.values():
        assert_printed_ratio(speed_up, onednn, stock)


def test_ceiling_times_each_model_with_its_gather_free_and_with_window_keys_only(capsys):
    out = run_here(capsys, *DEMO, "--ceiling", "--mode", "both", "--models", PEER, MODEL, "--reps", "1")
    rows = table(out, "attention ceiling")
    variants = list(benchmark.CEILING_VARIANTS)
    assert list(rows) == [f"{m}, {v}" for m in (PEER, MODEL) for v in variants] + [PEER]
    for cells in rows.values():
        for cell, peer_cell in zip(cells, rows[PEER]):
            ips, ratio = CELL.match(cell).groups()[:2]
            assert_printed_ratio(ratio, ips, CELL.match(peer_cell).group(1))


def test_ceiling_refuses_kernel_suffixes():
    with pytest.raises(SystemExit, match="--ceiling times plain models"):
        benchmark.main([*DEMO, "--ceiling", "--models", MODEL + "+kernels"])


@pytest.mark.parametrize("name", [PEER, MODEL])
def test_free_gather_ablation_is_the_models_own_attention_then_skips_the_gather(name):
    """What --ceiling times as 'gather free': the first call computes the model's attention exactly; later calls
    reuse those keys and values (no index_select) and so no longer follow their input."""
    model = benchmark.create(name, 64).eval()
    ablated = benchmark.create(name, 64).eval()
    ablated.load_state_dict(model.state_dict())
    for attn in ablated.modules():
        if isinstance(attn, benchmark.WindowedAttention):
            benchmark.ablate_gather(attn, "all")
    first, second = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    n_attention = sum(isinstance(m, benchmark.WindowedAttention) for m in model.modules())

    def index_selects(net):
        with torch.profiler.profile() as prof:
            out = net(second)
        return out, sum(e.count for e in prof.key_averages() if e.key == "aten::index_select")
    with torch.no_grad():
        torch.testing.assert_close(ablated(first), model(first), rtol=0, atol=1e-6)
        (stale, ablated_calls), (fresh, plain_calls) = index_selects(ablated), index_selects(model)
    assert plain_calls - ablated_calls == 2 * n_attention  # keys and values of every attention layer
    assert not torch.allclose(stale, fresh, atol=1e-3)


def test_autocast_precision_is_applied_and_named(capsys, tmp_path):
    out = run_here(capsys, *DEMO, "--amp", "bf16", "--mode", "both", "--no-memory",
                   "--json", str(tmp_path / "bench.json"))
    assert "timing train at 64x64, batch 2, bf16 autocast" in out
    assert "alternating repetitions on" in out and ", bf16 autocast\n" in out
    check_speed_table(out, json.loads((tmp_path / "bench.json").read_text()), ["infer_64", "train_64"])


def test_training_step_runs_under_the_requested_autocast():
    model = benchmark.create(PEER, 64)
    dtypes = []
    model.head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    for amp, dtype in (("bf16", torch.bfloat16), ("none", torch.float32)):
        benchmark.training_step(model, torch.randn(2, 3, 64, 64), amp=amp)()
        assert dtypes[-1] == dtype
