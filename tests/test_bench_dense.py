"""tools/bench_dense.py (a developer tool): the default configs follow detection.config.DETECTORS, the synthetic
targets are what the detectors train on, the memory column sees a known allocation, and a tiny run prints and
writes every figure with its ratio to the peer."""
import json
import os

import pytest
import torch

from detection.config import DETECTORS
from tests.helpers import REPO
from tools import bench_dense

CELL_KEYS = ["train_images_per_s", "train_peak_mb", "infer_images_per_s", "infer_peak_mb"]


def test_default_configs_take_the_first_focal_t_config_of_each_detector(tmp_path, capsys, monkeypatch):
    """A config with its own backbone shape (the demos) is not Focal-T; a detector without a Focal-T config is
    named, not timed. A detector added to DETECTORS is looked for like the others."""
    monkeypatch.setattr(bench_dense, "DETECTORS", (*DETECTORS, "newcomer"))
    (tmp_path / "a_demo.yaml").write_text("MODEL:\n  DETECTOR: retinanet\n  BACKBONE_ARGS:\n    embed_dim: 32\n")
    (tmp_path / "b_retina.yaml").write_text("MODEL:\n  DETECTOR: retinanet\n")
    (tmp_path / "c_retina.yaml").write_text("MODEL:\n  DETECTOR: retinanet\n")
    (tmp_path / "d_mask.yaml").write_text("MODEL:\n  DETECTOR: mask_rcnn\n")
    (tmp_path / "mask_focal_tiny_patch4_window7.yaml").write_text("MODEL:\n  DETECTOR: mask_rcnn\n")
    (tmp_path / "e_small.yaml").write_text("MODEL:\n  DETECTOR: fcos\n  BACKBONE: focal_small_patch4_window7_224\n")
    chosen = bench_dense.default_configs(str(tmp_path))
    # In DETECTORS' order; a config named after the backbone first, then by name.
    assert [os.path.basename(p) for p in chosen] == ["mask_focal_tiny_patch4_window7.yaml", "b_retina.yaml"]
    out = capsys.readouterr().out
    assert "builds fcos on focal_tiny" in out and "builds newcomer on focal_tiny" in out


def test_the_repository_has_a_focal_t_config_for_every_detector():
    chosen = [bench_dense.load_config(p, None, bench_dense.detection_defaults()).MODEL.DETECTOR
              for p in bench_dense.default_configs()]
    assert chosen == list(DETECTORS)


def test_synthetic_targets_are_boxes_of_at_least_32_pixels_inside_the_image_with_their_masks():
    images, targets = bench_dense.synthetic_batch((96, 160), 2, True, torch.Generator().manual_seed(0),
                                                  torch.device("cpu"))
    assert [tuple(i.shape) for i in images] == [(3, 96, 160)] * 2
    for target in targets:
        boxes = target["boxes"]
        assert boxes.shape == (bench_dense.BOXES, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 96).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 31).all()  # 32 px, less at most 1 for the floor of each corner
        assert ((1 <= target["labels"]) & (target["labels"] <= 80)).all()
        for mask, (x1, y1, x2, y2) in zip(target["masks"], boxes.long().tolist()):
            assert mask.sum() == (x2 - x1) * (y2 - y1) == mask[y1:y2, x1:x2].sum()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU peak memory is read from Linux's /proc")
def test_cpu_memory_column_sees_a_known_allocation():
    # 25,000,000 float32 values of ones: 100,000,000 bytes = 95.4 MiB written at the step's peak, less what the
    # allocator takes from pages already resident before the step (measured once at 94.97 under load): a tenth
    # of it is allowed either way, far from the 0 of a column that misses the allocation.
    def step(_):
        torch.ones(25_000_000).sum()
    seconds, peak = bench_dense.measured(step, None, torch.device("cpu"))
    assert seconds > 0 and 0.9 * 95.4 <= peak < 95.4 + 20


@pytest.mark.slow
def test_tiny_run_prints_and_writes_each_figure_and_its_ratio(tmp_path, capsys):
    """Mask R-CNN of the demo config (a 2.8M-parameter Focal and the same-shaped Swin) at 64x96 and 64x86."""
    path = tmp_path / "bench.json"
    bench_dense.main(["--cfg", str(REPO / "configs" / "detection" / "demo.yaml"), "--size", "64x96", "--reps", "2",
                      "--warmup", "0", "--device", "cpu", "--json", str(path)])
    out = capsys.readouterr().out
    assert "demo focal_tiny_patch4_window7_224 train 64x96" in out and "demo swin_tiny_patch4_window7_224 infer 64x86" \
        in out  # the progress lines name each call and its size, which alternates
    figures = json.loads(path.read_text())["demo"]
    focal, peer = figures["backbones"]["focal"], figures["backbones"]["peer"]
    assert figures["detector"] == "mask_rcnn" and peer["backbone"] == "swin_tiny_patch4_window7_224"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| demo")]
    rows = {tuple(row[:2]): row[2:] for row in cells}
    for key, row in (("focal", focal), ("peer", peer)):
        cells = rows[("demo", row["backbone"])]
        assert cells[0] == f"{row['params_m']:.1f}"
        assert cells[1::2] == [f"{row[k]:.2f}" for k in CELL_KEYS[0::2]] and all(row[k] > 0 for k in CELL_KEYS[0::2])
        assert cells[2::2] == [f"{row[k]:.0f}" for k in CELL_KEYS[1::2]]
    ratios = rows[("demo", "Focal / peer")]
    assert ratios == [f"{focal[k] / peer[k]:.2f}x" if peer[k] else "-" for k in ["params_m", *CELL_KEYS]]


@pytest.mark.parametrize("argv, flag", [(["--size", "16"], "--size"), (["--reps", "0"], "--reps"),
                                        (["--cfg", "missing.yaml"], "--cfg"), (["--mode", "predict"], "--mode")])
def test_bad_flags_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        bench_dense.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_a_json_file_that_cannot_be_written_is_refused_before_timing(tmp_path, monkeypatch):
    """As the classification benchmark does: not after minutes of timing."""
    monkeypatch.setattr(bench_dense, "bench_config", lambda *a: pytest.fail("timed before checking --json"))
    for path in (tmp_path / "missing" / "figures.json", tmp_path):
        with pytest.raises(SystemExit, match=f"--json {path}: cannot write there"):
            bench_dense.main(["--cfg", str(REPO / "configs" / "detection" / "demo.yaml"), "--json", str(path)])
