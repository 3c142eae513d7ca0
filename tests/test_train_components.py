"""Optimisation, schedules, precision, the training step and checkpoints, in process on tiny models."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch.nn as nn

from config import UsageError, get_config, load_config
from engine import build_precision, default_amp, evaluate
from logger import close_log_files, create_logger
from lr_scheduler import build_scheduler, scale_rates
from main import main, parse_args
from models import build_model
from optimizer import build_optimizer
from utils import (latest_checkpoint, load_pretrained, read_checkpoint, restore_checkpoint, save_checkpoint,
                   training_state)

from tests.helpers import (CPU, DEMO_CFG, LOG, REPO, SMALL, assert_gradients_agree, fake_batches, run_dir, run_epoch,
                           tiny_config)

FIXTURE_OPTS = SMALL  # the architecture of tests/fixtures/small_fc_224.pth


def test_no_weight_decay_on_norms_biases_and_position_tables():
    model = build_model(tiny_config())
    optimizer = build_optimizer(tiny_config(), model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    no_decay, decay = groups[0.0], groups[0.05]
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    assert any("relative_position_bias_table_to_neighbors" in n for n in no_decay)
    assert all(n in no_decay for n in names.values() if n.endswith(".bias") or "norm" in n)
    assert "layers.0.blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    assert isinstance(optimizer, torch.optim.AdamW)
    assert isinstance(build_optimizer(tiny_config("TRAIN.OPTIMIZER.NAME", "sgd"), model), torch.optim.SGD)


def lr_curve(name: str):
    config = tiny_config("TRAIN.EPOCHS", 4, "TRAIN.WARMUP_EPOCHS", 1, "TRAIN.BASE_LR", 1.0, "TRAIN.WARMUP_LR", 0.0,
                         "TRAIN.MIN_LR", 0.01, "TRAIN.LR_SCHEDULER.NAME", name,
                         "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", 2, "TRAIN.LR_SCHEDULER.DECAY_RATE", 0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch=10)
    lrs = []
    for update in range(41):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_schedules_warm_up_per_update_then_decay():
    for name in ("cosine", "linear", "step"):
        lrs = lr_curve(name)
        assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0), name
    cosine, linear, step = lr_curve("cosine"), lr_curve("linear"), lr_curve("step")
    assert cosine[40] == pytest.approx(0.01) and cosine[25] == pytest.approx(0.505)
    assert linear[40] == pytest.approx(0.01) and linear[25] == pytest.approx(0.505)
    assert step[29] == pytest.approx(1.0) and step[30] == pytest.approx(0.1)  # 2 epochs after the warm-up


def test_learning_rate_scales_with_total_batch():
    config = tiny_config("DATA.BATCH_SIZE", 64, "TRAIN.ACCUMULATION_STEPS", 2, "TRAIN.BASE_LR", 5e-4,
                         "TRAIN.WARMUP_LR", 5e-7, "TRAIN.MIN_LR", 5e-6)
    scale_rates(config, 64 * 8 * 2)  # 64 images x 8 processes x 2 accumulation steps per update
    assert (config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR) == pytest.approx((1e-3, 1e-6, 1e-5))
    assert config.is_frozen()


def test_saved_config_reruns_at_the_rates_it_trained_with(previous_run):
    """config.yaml holds the scaled rates and the batch they are for: a run of it at that batch keeps them, a run
    at twice the batch doubles them (not the rates of the original config scaled twice)."""
    saved = run_dir(previous_run) / "config.yaml"
    trained = load_config(str(saved))
    assert trained.TRAIN.LR_BATCH == trained.DATA.BATCH_SIZE  # one process, no accumulation
    again = load_config(str(saved))
    scale_rates(again, again.DATA.BATCH_SIZE)
    assert (again.TRAIN.BASE_LR, again.TRAIN.WARMUP_LR, again.TRAIN.MIN_LR) == \
        (trained.TRAIN.BASE_LR, trained.TRAIN.WARMUP_LR, trained.TRAIN.MIN_LR)
    scale_rates(again, 2 * again.DATA.BATCH_SIZE)
    assert again.TRAIN.BASE_LR == pytest.approx(2 * trained.TRAIN.BASE_LR)


def test_a_saved_config_reruns_in_its_own_run_folder(previous_run):
    """--cfg <run>/config.yaml without --output writes to (and auto-resumes) that run's folder: the saved OUTPUT
    was the run folder, to which the name and tag were joined again, nesting a fresh run inside the old one."""
    from config import get_config
    saved = run_dir(previous_run) / "config.yaml"
    rerun = get_config(argparse.Namespace(cfg=str(saved), opts=None))
    assert rerun.OUTPUT == str(run_dir(previous_run))


def test_accumulation_updates_once_per_group_and_matches_a_big_batch():
    batches = fake_batches(5)
    precision = build_precision("none", CPU)
    # SGD: its update is linear in the gradient, so equal gradients give equal weights (Adam's first step is not).
    base = ("MODEL.DROP_PATH_RATE", 0.0, "TRAIN.WARMUP_EPOCHS", 0, "TRAIN.CLIP_GRAD", 0.0,
            "TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.BASE_LR", 0.1, "TRAIN.WEIGHT_DECAY", 0.0)
    # the fifth batch cannot fill an update and is left out
    assert run_epoch(tiny_config("TRAIN.ACCUMULATION_STEPS", 2, *base), batches, precision)[2] == 2
    # Two accumulated micro-batches of 4 make the same update as one batch of 8: one step each, from the same
    # gradient, which SGD's first step keeps as its momentum (no weight decay: the buffer is the gradient alone).
    # The two sum the batch in another order: within float32's roundoff (helpers.assert_gradients_agree).
    accumulated = run_epoch(tiny_config("TRAIN.ACCUMULATION_STEPS", 2, *base), batches[:2], precision)
    merged = [(torch.cat([batches[0][0], batches[1][0]]), torch.cat([batches[0][1], batches[1][1]]))]
    single = run_epoch(tiny_config(*base), merged, precision)
    assert accumulated[2] == single[2] == 1
    got, want = ([optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
                 for model, optimizer, _ in (accumulated, single))
    assert_gradients_agree(got, want, single[0], merged[0][0])


def test_bf16_autocast_trains_on_cpu_and_fp16_needs_cuda():
    model, _, steps = run_epoch(tiny_config(), fake_batches(2), build_precision("bf16", CPU))
    assert steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert build_precision("", CPU).dtype is None and build_precision("O0", CPU).dtype is None
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        build_precision("fp16", CPU)


def test_amp_defaults_to_bf16_on_gpus_that_support_it(monkeypatch):
    """No --amp: bf16 (no scaler) where the GPU computes it natively, fp16 on older GPUs, none on CPUs."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert default_amp(cuda) == "bf16"
    precision = build_precision("", cuda)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()  # bf16 needs no scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_amp(cuda) == "fp16"
    assert default_amp(cpu) == "none"  # and build_precision("", CPU) has no dtype: the test above


def test_evaluate_counts_hits_and_images():
    class Fixed(nn.Module):
        def forward(self, x):  # predicts class 0, then 1, 2, ... in order of confidence
            return torch.arange(10, 0, -1, dtype=torch.float32).repeat(x.shape[0], 1)
    batches = [(torch.zeros(3, 1), torch.tensor([0, 1, 7])), (torch.zeros(1, 1), torch.tensor([4]))]
    result = evaluate(tiny_config(), Fixed(), batches, build_precision("none", CPU), CPU)
    assert (result.acc1, result.acc5, result.num_images) == (25.0, 75.0, 4)


def test_keep_checkpoints_never_removes_the_checkpoint_just_saved(tmp_path):
    """--resume of ckpt_epoch_0 into a folder holding epochs 0-2 of an earlier run, with KEEP_CHECKPOINTS 1: the
    run logged 'saved ckpt_epoch_1' then 'removed ckpt_epoch_1' (the stale epoch 2 was the newest by number), so a
    crash there auto-resumed from the abandoned run's epoch 2."""
    model, optimizer, _ = run_epoch(tiny_config(), fake_batches(2), build_precision("none", CPU))
    scheduler, scaler = build_scheduler(tiny_config(), optimizer, 2), build_precision("none", CPU).scaler
    for keep, epochs in ((0, (0, 1, 2)), (1, (1,))):
        config = tiny_config("OUTPUT", str(tmp_path), "KEEP_CHECKPOINTS", keep)
        for epoch in epochs:
            save_checkpoint(config, training_state(config, epoch, epoch, model, 0.0, optimizer, scheduler, scaler), LOG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_epoch_1.pth"]
    assert latest_checkpoint(str(tmp_path), LOG).path == str(tmp_path / "ckpt_epoch_1.pth")


def test_resuming_an_older_epoch_warns_of_the_later_ones_auto_resume_would_take(tmp_path, caplog):
    """--resume of epoch 1 into a folder holding epochs 1-3 of an earlier run: with KEEP_CHECKPOINTS 0 (or before
    this run overwrites them), a stop then auto-resumed from the abandoned run's epoch 3 without a word."""
    config = tiny_config("OUTPUT", str(tmp_path), "KEEP_CHECKPOINTS", 0)
    model, optimizer, _ = run_epoch(config, fake_batches(2), build_precision("none", CPU))
    scheduler, scaler = build_scheduler(config, optimizer, 2), build_precision("none", CPU).scaler
    for epoch in (1, 2, 3):
        save_checkpoint(config, training_state(config, epoch, epoch, model, 0.0, optimizer, scheduler, scaler), LOG)
    for epoch, later in ((1, "ckpt_epoch_3.pth, ckpt_epoch_2.pth"), (3, None)):
        caplog.clear()
        resumed = read_checkpoint(str(tmp_path / f"ckpt_epoch_{epoch}.pth"), LOG)
        fresh = build_model(config)
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            restore_checkpoint(resumed, fresh, LOG, build_optimizer(config, fresh), scaler, config)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if later is None:
            assert warnings == []
        else:
            assert len(warnings) == 1 and f"later epochs than the resumed epoch {epoch} ({later})" in warnings[0]


def test_a_resume_whose_weights_need_resizing_is_refused_and_evaluation_still_resizes(tmp_path):
    """Trained at 96, resumed at 128: the last stage's window grows, so its position tables and pooling kernel
    would be resampled while the optimizer's moments keep the old shapes (the first step then failed with 'The size
    of tensor a (9) must match the size of tensor b (16)'). Evaluating the same file at 128 resizes them."""
    config = tiny_config("OUTPUT", str(tmp_path), "DATA.IMG_SIZE", 96)
    model, optimizer, _ = run_epoch(config, fake_batches(2, size=96), build_precision("none", CPU))
    scheduler, scaler = build_scheduler(config, optimizer, 2), build_precision("none", CPU).scaler
    path = save_checkpoint(config, training_state(config, 0, 2, model, 0.0, optimizer, scheduler, scaler), LOG)
    larger = tiny_config("OUTPUT", str(tmp_path), "DATA.IMG_SIZE", 128)
    fresh = build_model(larger)
    with pytest.raises(UsageError, match=r"3 tensors would have to be resized .*layers\.3\.blocks\.0\..*"
                                         r"DATA\.IMG_SIZE 96 \(this config: 128\).*new run with --pretrained"):
        restore_checkpoint(read_checkpoint(path, LOG), fresh, LOG, build_optimizer(larger, fresh), scaler, larger)
    assert restore_checkpoint(read_checkpoint(path, LOG), fresh, LOG, config=larger) == (0, 0, 0.0)


def test_checkpoint_round_trip_latest_by_epoch_and_keep_last(tmp_path):
    config = tiny_config("OUTPUT", str(tmp_path), "KEEP_CHECKPOINTS", 2)
    model, optimizer, _ = run_epoch(config, fake_batches(2), build_precision("none", CPU))
    scheduler = build_scheduler(config, optimizer, 2)
    scheduler.step_update(7)
    precision = build_precision("none", CPU)
    for epoch in (2, 10, 9):
        save_checkpoint(config, training_state(config, epoch, 2 * epoch + 2, model, 42.5, optimizer, scheduler,
                                               precision.scaler), LOG)
    # Only the two newest by epoch are kept, and no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_epoch_10.pth", "ckpt_epoch_9.pth"]
    latest = latest_checkpoint(str(tmp_path), LOG)
    assert latest.path == str(tmp_path / "ckpt_epoch_10.pth") and latest_checkpoint(str(tmp_path / "none"), LOG) is None

    fresh = build_model(config)
    fresh_optimizer = build_optimizer(config, fresh)
    fresh_scheduler = build_scheduler(config, fresh_optimizer, 2)
    epoch, step, best = restore_checkpoint(latest, fresh, LOG, fresh_optimizer, precision.scaler, config)
    assert (epoch, step, best) == (11, 22, 42.5)
    # The schedule is rebuilt from the config, not loaded: at the same update it gives the same rate.
    fresh_scheduler.step_update(7)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    torch.testing.assert_close(fresh_optimizer.state_dict(), optimizer.state_dict(), rtol=0, atol=0)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_of_released_weights_starts_at_epoch_zero_and_other_models_are_refused(tmp_path):
    fixture = str(REPO / "tests" / "fixtures" / "small_fc_224.pth")
    model = build_model(load_config(None, FIXTURE_OPTS))
    assert restore_checkpoint(read_checkpoint(fixture, LOG), model, LOG)[0] == 0
    with pytest.raises(UsageError, match=r"--resume .*mismatched shapes for 2 keys: head.weight.*--pretrained"):
        restore_checkpoint(read_checkpoint(fixture, LOG),
                           build_model(load_config(None, FIXTURE_OPTS + ["MODEL.NUM_CLASSES", 5])), LOG)


def test_reference_checkpoints_with_a_pickled_config_load_safely(tmp_path, caplog):
    fixture = torch.load(REPO / "tests" / "fixtures" / "small_fc_224.pth", weights_only=True)
    path = tmp_path / "reference.pth"
    torch.save({**fixture, "config": load_config()}, path)  # the reference stored its yacs CfgNode
    with caplog.at_level(logging.WARNING, logger="focal.test"):
        checkpoint = read_checkpoint(str(path), LOG)
    assert restore_checkpoint(checkpoint, build_model(load_config(None, FIXTURE_OPTS)), LOG)[0] == 0
    assert checkpoint.state["config"]["DATA"]["IMG_SIZE"] == 224  # a plain mapping
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # and no warning


def test_pretrained_drops_another_head(caplog):
    fixture = str(REPO / "tests" / "fixtures" / "small_fc_224.pth")
    weights = torch.load(fixture, weights_only=True)["model"]
    model = build_model(load_config(None, FIXTURE_OPTS + ["MODEL.NUM_CLASSES", 5]))
    with caplog.at_level(logging.INFO, logger="focal.test"):
        load_pretrained(fixture, model, LOG)
    # the released file's 176 tensors: 152 load, the 2 of its 1000-class head do not, and 22 are index tables
    assert ("152 of its 176 tensors loaded; 0 resized; 0 derived from its tables; 2 left at initial values: "
            "head.weight, head.bias; 22 index tables not loaded (this model builds its own)") in caplog.text
    state = model.state_dict()
    assert state["head.weight"].shape == (5, 128)
    assert all(torch.equal(state[k], weights[k]) for k in state if not k.startswith("head."))


def test_pretrained_at_another_window_size_resizes_every_window_tensor(tmp_path, capsys):
    """The console names a few of the resized and derived tensors; the log file names them all."""
    fixture = str(REPO / "tests" / "fixtures" / "small_fc_224.pth")
    weights = torch.load(fixture, weights_only=True)["model"]
    model = build_model(load_config(None, FIXTURE_OPTS + ["MODEL.FOCAL.WINDOW_SIZE", 5,
                                                          "MODEL.FOCAL.EXPAND_SIZES", "[2,2,2,2]"]))
    logger = create_logger(str(tmp_path), name="focal.test.load")
    load_pretrained(fixture, model, logger)
    close_log_files(logger)
    state = model.state_dict()
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert weights[table].shape == (169, 2) and state[table].shape == (81, 2)
    # window, neighbour and pooled position tables and the fc pooling kernels all follow the window: 30 of the
    # file's tensors resized; the last stage's 2 blocks now need neighbour tables (7x7 map, 5x5 window) the file
    # lacks, derived from their window tables: 154 of its 176 loaded (22 index tables), 156 in the model
    resized = [name for name in weights if name in state and state[name].shape != weights[name].shape]
    derived = sorted(set(state) - set(weights))
    assert len(resized) == 30 and len(derived) == 2
    console, log = capsys.readouterr().out, (tmp_path / "log_rank0.txt").read_text()
    assert (f"154 of its 176 tensors loaded; 30 resized: {', '.join(resized[:3])} and 27 more; 2 derived from its "
            f"tables: {', '.join(derived)}; 0 left at initial values: none") in console
    assert "(every name)" not in console and f"(every name): 154 of its 176 tensors loaded; 30 resized: " \
        f"{', '.join(resized)}; 2 derived" in log
    assert state["layers.0.blocks.0.pool_layers.0.weight"].shape == (1, 25)
    assert torch.equal(state["head.weight"], weights["head.weight"])


def test_bad_flags_raise_errors_that_name_them(demo_data, tmp_path):
    common = ["--cfg", DEMO_CFG, "--data-path", str(demo_data), "--output", str(tmp_path)]
    cases = [
        (["--batch-size", "0"], r"--batch-size \(DATA.BATCH_SIZE\) must be at least 1"),
        (["--accumulation-steps", "0"], r"--accumulation-steps \(TRAIN.ACCUMULATION_STEPS\) must be at least 1"),
        (["--opts", "TRAIN.EPOCH", "3"], r"TRAIN.EPOCH"),
        (["--eval", "--opts", "DATA.IMG_SIZE", "32"], r"--eval needs weights: pass --resume"),
        (["--batch-size", "64", "--opts", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0"], r"no full batch"),
        (["--resume", str(tmp_path / "missing.pth"), "--opts", "DATA.IMG_SIZE", "32"], "checkpoint not found"),
    ]
    for flags, message in cases:
        with pytest.raises(UsageError, match=message):
            main(common + flags)
    with pytest.raises(UsageError, match="--data-path"):
        get_config(parse_args(["--cfg", DEMO_CFG]))
    assert get_config(parse_args(["--cfg", DEMO_CFG, "--throughput"])).THROUGHPUT_MODE
    assert get_config(parse_args(["--cfg", DEMO_CFG, "--throughput", "--disable-amp"])).AMP_OPT_LEVEL == "none"
