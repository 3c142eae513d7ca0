"""The benchmark CLI runs end to end on small models: speed table with ratios, memory probes, JSON, gather mode."""
import json
import subprocess
import sys

from tests.helpers import REPO
DEMO = ["--models", "configs/demo/focalv2_demo.yaml", "--peer", "configs/demo/focal_demo.yaml",
        "--img-size", "64", "--batch-size", "2", "--reps", "2", "--min-seconds", "0.01"]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_speed_and_memory_tables_with_ratios_to_the_peer(tmp_path):
    out = run(*DEMO, "--mode", "both", "--json", str(tmp_path / "bench.json"))
    assert "| configs/demo/focal_demo.yaml" in out and "(1.00x)" in out  # the peer against itself
    assert "training-step memory" in out
    figures = json.loads((tmp_path / "bench.json").read_text())
    demo = figures["configs/demo/focalv2_demo.yaml"]
    assert demo["infer_64"] > 0 and demo["train_64"] > 0 and demo["train_peak_mb_64"] > 100


def test_gather_methods_are_compared_against_roll():
    out = run(*DEMO, "--gather", "--models", "configs/demo/focal_demo.yaml")
    for method in ("index", "unfold", "roll"):
        assert f"| {method}" in out
    assert "1.00x" in out  # roll against itself


def test_gather_mode_refuses_a_focalv2_model():
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", *DEMO, "--gather"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--gather needs a v1" in done.stderr


def test_compile_mode_times_compiled_models():
    out = run(*DEMO, "--mode", "infer", "--compile", "--no-memory")
    assert "timing infer under torch.compile" in out and "(1.00x)" in out


def test_kernels_suffix_gives_the_gain_over_the_plain_model():
    out = run(*DEMO, "--mode", "infer", "--no-memory", "--models", "configs/demo/focalv2_demo.yaml",
              "configs/demo/focalv2_demo.yaml+kernels")
    row = next(line for line in out.splitlines() if line.startswith("| configs/demo/focalv2_demo.yaml+kernels"))
    assert "x of configs/demo/focalv2_demo.yaml)" in row
    assert "kernels on cpu: attention, bias_cache" in out


def test_before_and_after_against_another_checkout():
    out = run(*DEMO, "--mode", "infer", "--no-memory", "--baseline", str(REPO), "--models",
              "base:configs/demo/focalv2_demo.yaml")
    assert "| base:configs/demo/focalv2_demo.yaml" in out


def test_suffixes_apply_the_device_kernels():
    from models.kernels.cpu_attention import CpuKernels
    from models.kernels.onednn_linear import OneDnnLinear
    from tools.benchmark import create
    plain = create("configs/demo/focal_demo.yaml", 64)
    assert not any(isinstance(m, (CpuKernels, OneDnnLinear)) for m in plain.modules())
    fast = create("configs/demo/focal_demo.yaml+kernels", 64)
    assert any(isinstance(m, CpuKernels) for m in fast.modules())
    swin = create("timm:swin_tiny_patch4_window7_224+onednn", 224)
    assert any(isinstance(m, OneDnnLinear) for m in swin.modules())


def test_kernels_mode_compares_linear_kernels_per_layer():
    out = run("--kernels", "--img-size", "32", "--batch-size", "1", "--reps", "1", "--min-seconds", "0.001")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines() if "| stage" in line}
    assert len(rows) == 16 and rows["stage 1 qkv"] == "64x96 -> 288" and rows["stage 4 fc2"] == "1x3072 -> 768"
