"""The benchmark CLI (a developer tool) on small models: what could mislead a reader of its tables. Ratios to the
peer come from the timed figures, a new size is timed with its layouts rebuilt, suffixes apply the kernels, bad
flags are refused by name, the ceiling's ablation starts from the model's own attention, autocast is applied."""
import json
import re

import pytest
import torch

import logger
from tools import benchmark

PEER = "configs/demo/focal_demo.yaml"
MODEL = "configs/demo/focalv2_demo.yaml"
DEMO = ["--models", MODEL, "--peer", PEER, "--img-size", "64", "--batch-size", "2", "--reps", "2",
        "--min-seconds", "0.01"]
CELL = re.compile(r"^([\d.]+) \(([\d.]+)x\)$")


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


@pytest.mark.slow
def test_speed_and_memory_tables_with_ratios_to_the_peer(tmp_path, capsys):
    """The file's one run with memory probes (each a process of its own): every model's row holds its timed
    figures, and their ratios to the peer's, the peer first in the memory table."""
    out = run_here(capsys, *DEMO, "--mode", "both", "--json", str(tmp_path / "bench.json"))
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert set(figures) == {MODEL, PEER}
    speed = table(out, "images/s, medians")
    assert set(speed) == {MODEL, PEER}
    for name, cells in speed.items():  # each cell: the model's timed images/s and its ratio to the peer's
        for key, cell in zip(["infer_64", "train_64"], cells):
            ips, ratio = CELL.match(cell).groups()
            value = figures[name][key]
            assert value > 0 and ips == f"{value:.2f}"
            assert ratio == f"{value / figures[PEER][key]:.2f}", (name, key, cell)
    memory = table(out, "training-step memory")
    assert list(memory) == [PEER, MODEL]  # the peer first
    for name, (mb, ratio) in memory.items():
        peak = figures[name]["train_peak_mb_64"]
        assert peak > 100 and mb == f"{peak:.0f}"
        assert ratio == f"{peak / figures[PEER]['train_peak_mb_64']:.2f}x"


def test_sizes_mode_times_a_new_size_with_an_empty_layout_cache(monkeypatch):
    """The first-call step rebuilds every layout of the model; the cached step rebuilds none."""
    benchmark.LAYOUTS.clear()  # from an earlier test of this process
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


@pytest.mark.parametrize("size", ["0", "-8"])
def test_speed_mode_refuses_a_size_that_is_not_positive_naming_the_flag(size, capsys):
    """A negative --img-size once ran to a traceback from torch.randn after the models were built."""
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--img-size", "224", size])
    assert "--img-size" in capsys.readouterr().err


@pytest.mark.parametrize("args, flag", [(["--ceiling", "--sizes", "448"], "--sizes"),
                                        (["--kernels", "--sizes", "448"], "--sizes"),
                                        (["--sizes", "448", "--plot", "x.png"], "--plot"),
                                        (["--ceiling", "--plot", "x.png"], "--plot"),
                                        (["--mode", "train", "--plot", "x.png"], "--plot")])
def test_flags_of_another_mode_are_refused_not_ignored(args, flag, capsys):
    """--ceiling and --kernels time one square size: --sizes next to them once timed 224 px without a word;
    --plot under --mode train (no inference figures to draw) ended in a traceback after the timing."""
    with pytest.raises(SystemExit):
        benchmark.parse_args(args)
    assert flag in capsys.readouterr().err


def test_suffixes_apply_the_device_kernels():
    from models.kernels.cpu_attention import CpuKernels
    from models.kernels.onednn_linear import OneDnnLinear
    plain = benchmark.create(PEER, 64)
    assert not any(isinstance(m, (CpuKernels, OneDnnLinear)) for m in plain.modules())
    fast = benchmark.create(PEER + "+kernels", 64)
    assert any(isinstance(m, CpuKernels) for m in fast.modules())
    swin = benchmark.create("timm:swin_tiny_patch4_window7_224+onednn", 224)
    assert any(isinstance(m, OneDnnLinear) for m in swin.modules())


def test_kernels_mode_lists_every_linear_layer_shape(capsys, tmp_path):
    """One row per distinct linear layer of the released Focal-T, with the shape it multiplies at that size, and
    the same layers in --json."""
    out = run_here(capsys, "--kernels", "--img-size", "32", "--batch-size", "1", "--reps", "1",
                   "--min-seconds", "0.001", "--json", str(tmp_path / "kernels.json"))
    rows = table(out, "linear layers at 32px")
    assert len(rows) == 16 and rows["stage 1 qkv"][0] == "64x96 -> 288" and rows["stage 4 fc2"][0] == "1x3072 -> 768"
    figures = json.loads((tmp_path / "kernels.json").read_text())
    assert sorted(figures) == sorted(rows) and all(set(f) == {"stock", "onednn"} for f in figures.values())


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
        torch.testing.assert_close(ablated(first), model(first), rtol=0, atol=0)  # the same operations, in order
        (stale, ablated_calls), (fresh, plain_calls) = index_selects(ablated), index_selects(model)
    assert plain_calls - ablated_calls == 2 * n_attention  # keys and values of every attention layer
    assert not torch.allclose(stale, fresh, atol=1e-3)  # another input's keys: no rounding, a different output


def test_training_step_runs_under_the_requested_autocast():
    model = benchmark.create(PEER, 64)
    dtypes = []
    model.head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    for amp, dtype in (("bf16", torch.bfloat16), ("none", torch.float32)):
        benchmark.training_step(model, torch.randn(2, 3, 64, 64), amp=amp)()
        assert dtypes[-1] == dtype


@pytest.mark.parametrize("backend", ["inductr", "no_such_backend"])
def test_compile_with_an_unknown_backend_is_refused_before_any_timing(backend, capsys):
    """main.py's rule for COMPILE, in one line; the default and a known backend pass."""
    with pytest.raises(SystemExit) as stop:
        benchmark.parse_args(["--compile", backend])
    assert stop.value.code == 2
    assert f"--compile must name a torch.compile backend (torch._dynamo.list_backends(), e.g. inductor, aot_eager or " \
           f"eager), got {backend!r}" in capsys.readouterr().err
    assert benchmark.parse_args(["--compile"]).compile == "inductor"
    assert benchmark.parse_args(["--compile", "aot_eager"]).compile == "aot_eager"


@pytest.mark.parametrize("args, steps, label", [
    (["--mode", "infer"], 2, "infer 64px"),  # the model and the peer
    (["--mode", "train", "--no-memory"], 2, "train 64px"),
    (["--sizes", "64", "96x64"], 2 * 2 * 2, "infer 96x64"),  # 2 sizes, each model cached and on a first call
    (["--ceiling", "--mode", "infer"], 3 + 1, "infer 64px"),  # the model's 3 variants and the peer
])
def test_progress_lines_count_every_timed_call_and_name_it(args, steps, label, capsys, monkeypatch):
    """With a report due at every call, the lines number them all, 1 to the run's total: per step one warm-up
    call, one that sizes the repetitions and --reps 2 repetitions, so 4 a step."""
    monkeypatch.setattr(logger, "REPORT_SECONDS", 0.0)
    out = run_here(capsys, *DEMO, *args)
    lines = re.findall(r"^\[(\d+)/(\d+)\] eta \d+:\d\d:\d\d  (.+)$", out, re.M)
    total = 4 * steps
    assert [(int(k), int(n)) for k, n, _ in lines] == [(k, total) for k in range(1, total + 1)]
    assert any(what.startswith(f"{label} {MODEL}") for _, _, what in lines)
    assert any(what.startswith(f"{label} {PEER}") for _, _, what in lines)
