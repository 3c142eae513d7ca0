"""Two CPU processes (gloo) train for an epoch on different shards, the segmentation demo model (dense/run.py) and
the classification demo model (main.py): afterwards both ranks hold the same weight average (EMA) and, for the
segmentation model, the same batch-norm statistics (the classification models have none), as they must to
evaluate and save one model (running statistics left per rank differ). And when batch norms become
SyncBatchNorm."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from config import get_config
from dense.demo import generate_segmentation
from dense.run import parse_args, training_task
from engine import DistEnv, fit, use_sync_batchnorm
from segmentation.config import SEGMENTATION_RULES, segmentation_defaults
from segmentation.train import TASK
from tests.helpers import BACKBONE_OPTS, REPO, demo_args, two_processes

CFG = str(REPO / "configs" / "segmentation" / "demo.yaml")
OPTS = ["DATA.SCALE", "[64, 64]", "DATA.CROP_SIZE", "64", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0",
        "MODEL.DECODER_CHANNELS", "16", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_ITERS", "0", "PRINT_FREQ", "1",
        "EVAL_FREQ", "1", "MODEL_EMA_DECAY", "0.5", *BACKBONE_OPTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank(rank: int, data: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        args = parse_args("test", ["--cfg", CFG, "--data-path", data, "--output", out, "--model-ema",
                                   "--device", "cpu", "--opts", *OPTS])
        config = get_config(args, segmentation_defaults(), SEGMENTATION_RULES)
        os.makedirs(config.OUTPUT, exist_ok=True)
        model, ema = fit(training_task(TASK), config, DistEnv(rank, 2, rank, torch.device("cpu")),
                         logging.getLogger(f"rank{rank}"), False)
        buffers = {k: v for k, v in model.state_dict().items() if "running_" in k}
        torch.save({"buffers": buffers, "ema": ema.module.state_dict()}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_end_an_epoch_with_the_same_statistics_and_average(tmp_path):
    data = generate_segmentation(str(tmp_path / "data"), size=64, train=8, val=2)
    two_processes(train_rank, data, str(tmp_path), free_port())
    first, second = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first["buffers"] and any(v.abs().sum() > 0 for k, v in first["buffers"].items() if "mean" in k)
    for part in ("buffers", "ema"):
        assert first[part].keys() == second[part].keys()
        for key, value in first[part].items():
            torch.testing.assert_close(second[part][key], value, rtol=0, atol=0, msg=f"{part} {key}")


def train_classification_rank(rank: int, data: str, out: str, port: int) -> None:
    """main.py's own run on one of two ranks, as torchrun would start it, keeping the EMA that run creates."""
    import engine
    import main
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    made = []
    create_ema = engine.create_ema

    def keep_ema(*args):
        made.append(create_ema(*args))
        return made[-1]

    engine.create_ema = keep_ema  # what the training driver calls
    main.main(demo_args(Path(data), Path(out), "--model-ema", "--device", "cpu", opts=("MODEL_EMA_DECAY", "0.5")))
    torch.save(made[0].module.state_dict(), os.path.join(out, f"ema{rank}.pt"))


@pytest.mark.slow
def test_two_classification_processes_end_an_epoch_with_the_same_average(demo_data, tmp_path):
    two_processes(train_classification_rank, str(demo_data), str(tmp_path), free_port())
    first, second = (torch.load(tmp_path / f"ema{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first.keys() == second.keys()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("world, device, key, converted", [
    (2, "cuda", True, True), (2, "cuda", False, False), (1, "cuda", True, False), (2, "cpu", True, False)])
def test_batch_norms_become_sync_batch_norms_on_gpus_of_a_multi_process_run(world, device, key, converted):
    """The conversion itself needs no GPU (only SyncBatchNorm's forward does)."""
    config = segmentation_defaults()
    config.MODEL.SYNC_BN = key
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    env = DistEnv(0, world, 0, torch.device(device))
    kinds = {type(m) for m in use_sync_batchnorm(model, config, env, logging.getLogger("test")).modules()}
    assert (torch.nn.SyncBatchNorm in kinds) == converted and (torch.nn.BatchNorm2d in kinds) != converted
