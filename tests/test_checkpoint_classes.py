"""predict.py and tools/export.py take the class count and names from the checkpoint: a 3-class checkpoint runs
with a 10-class config and no --opts, and its names come out with the predictions and inside the export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from config import UsageError, load_config
from models import build_model
from predict import parse_args, predict
from tests.helpers import DEMO_CFG, randomise

NAMES = ["circle", "square", "triangle"]


@pytest.fixture
def three_classes(tmp_path):
    """A demo-model checkpoint with a 3-class head and the class names main.py stores; the config says 10."""
    torch.manual_seed(0)
    model = randomise(build_model(load_config(DEMO_CFG, ["MODEL.NUM_CLASSES", 3])), std=0.05)
    path = tmp_path / "three.pth"
    torch.save({"model": model.state_dict(), "class_names": NAMES}, path)
    return path


def test_predict_reads_class_count_and_names_from_the_checkpoint(three_classes, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(image)
    predict(parse_args(["--cfg", DEMO_CFG, "--checkpoint", str(three_classes), "--device", "cpu", str(image)]))
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 3  # top-5 of 3 classes is all 3
    assert sorted(row.split()[-1] for row in rows) == NAMES
    with pytest.raises(UsageError, match=r"--checkpoint .*three.pth: cannot load into .*"
                                         r"\(the checkpoint has 3 classes\)"):
        predict(parse_args(["--cfg", DEMO_CFG, "--opts", "MODEL.NUM_CLASSES", "4", "--checkpoint", str(three_classes),
                            str(image)]))


@pytest.mark.slow
def test_pt2_export_carries_the_class_names_quietly(three_classes, tmp_path, entry_points):
    out = tmp_path / "three.pt2"
    done = entry_points.run(["-m", "tools.export", "--cfg", DEMO_CFG, "--checkpoint", str(three_classes), "--output",
                             str(out)])
    assert done.returncode == 0, done.stderr
    assert "Expect archive file" not in done.stderr  # torch's warning about the temporary file's name
    extra = {"class_names.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["class_names.json"]) == NAMES
    assert program.module()(torch.randn(1, 3, 64, 64)).shape == (1, 3)
