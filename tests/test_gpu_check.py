"""``make gpu-check`` on a machine without a GPU: one clear line and a non-zero exit, nothing else."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_fails_clearly_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU")


def test_log_patterns_match_what_main_prints():
    """The training and evaluation lines gpu_check parses, as engine.py formats them."""
    from tools.gpu_check import EVAL, LOSS
    assert LOSS.findall("Train: [0/1][3/20]\teta 0:00:01 lr 0.001000\ttime 0.1 (0.1)\tloss 2.3010 (2.2950)\t"
                        "grad_norm 1.0 (1.0)") == ["2.2950"]
    assert EVAL.findall(" * Acc@1 12.500 Acc@5 50.000 loss 2.2981 (20 images)") == [("12.500", "50.000", "2.2981")]
