"""Every entry point's --help names the program as it is run, documents every flag and shows the defaults that
are values (flags left unset take the config's value, which their help names)."""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest

from config import HelpFormatter

# program name -> (module, how its parser is reached)
ENTRY_POINTS = {
    "main.py": ("main", lambda m: m.parse_args([])),
    "predict.py": ("predict", lambda m: m.parse_args([])),
    "python -m tools.export": ("tools.export", lambda m: m.parse_args([])),
    "python -m tools.benchmark": ("tools.benchmark", lambda m: m.parse_args([])),
    "python -m tools.gpu_check": ("tools.gpu_check", lambda m: m.main([])),
    "python -m data.demo": ("data.demo", lambda m: m.main([])),
    "python -m dense.demo": ("dense.demo", lambda m: m.main()),
    "python -m detection.train": ("detection.train", lambda m: m.main(m.TASK, "detection.train")),
    "python -m segmentation.train": ("segmentation.train", lambda m: m.main(m.TASK, "segmentation.train")),
}


class Captured(Exception):
    pass


@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_help_names_the_program_and_documents_every_flag(prog, monkeypatch):
    module, reach = ENTRY_POINTS[prog]
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", ["/somewhere/else/entry.py"])
    with pytest.raises(Captured):
        reach(importlib.import_module(module))
    parser = parsers[0]
    assert parser.prog == prog
    assert parser.formatter_class is HelpFormatter
    text = parser.format_help()
    assert text.startswith(f"usage: {prog} ")
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{prog} {action.option_strings or action.dest} has no help text"
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0:
            assert f"(default: {action.default})" in " ".join(text.split()), (prog, action.dest)


def test_help_formatter_shows_only_defaults_that_are_values():
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="side")
    parser.add_argument("--seed", type=int, help="seed (SEED)")
    parser.add_argument("--zip", action="store_true", help="zip layout")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    text = parser.format_help()
    assert "side (default: 64)" in text and "(default: None)" not in text and "(default: False)" not in text
    assert "(default: True)" not in text  # --no-memory's help read "(default: True)"


def test_data_workers_are_capped_at_the_usable_cpus_with_one_line(monkeypatch, caplog):
    import os

    from data import build
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(build, "_CAPPED", set())
    with caplog.at_level("INFO", "focal.data"):
        assert [build.worker_count(n) for n in (8, 8, 2, 0)] == [2, 2, 2, 0]
    assert caplog.messages == ["DATA.NUM_WORKERS 8 capped at the 2 CPUs this process can use"]


def test_a_config_run_at_another_geometry_is_named_for_it():
    from config import get_config
    cfg = "configs/focal_tiny_patch4_window7_224.yaml"
    opts = ["DATA.IMG_SIZE", "384", "MODEL.FOCAL.WINDOW_SIZE", "12"]
    finetune = get_config(argparse.Namespace(cfg=cfg, data_path="data", opts=opts))
    assert finetune.MODEL.NAME == "focal_tiny_patch4_window12_384"
    assert finetune.OUTPUT == "output/focal_tiny_patch4_window12_384/default"
    released = get_config(argparse.Namespace(cfg=cfg, data_path="data", opts=None))
    assert released.MODEL.NAME == "focal_tiny_patch4_window7_224"
    opts = ["DATA.IMG_SIZE", "384", "MODEL.NAME", "mine_patch4_window7_224"]
    named = get_config(argparse.Namespace(cfg=cfg, data_path="data", opts=opts))
    assert named.MODEL.NAME == "mine_patch4_window7_224"  # a name given on the command line is kept


@pytest.mark.parametrize("module, argv", [
    ("main", ["--cfg", "c.yaml"]),
    ("predict", ["--cfg", "c.yaml", "--checkpoint", "w.pth", "x.jpg"]),
    ("tools.export", ["--cfg", "c.yaml", "--checkpoint", "w.pth", "--output", "m.pt2"]),
    ("dense.run", ["--cfg", "c.yaml"]),
])
def test_opts_given_twice_add_up(module, argv):
    """argparse keeps only the last of a repeated option: ``--opts DATA.IMG_SIZE 40 --opts DATA.BATCH_SIZE 2`` (an
    extra --opts appended by a script) silently dropped the image size and ran at the config's."""
    entry = importlib.import_module(module)
    argv = [*argv, "--opts", "DATA.IMG_SIZE", "40", "--opts", "DATA.BATCH_SIZE", "2"]
    args = entry.parse_args("a dense task", argv) if module == "dense.run" else entry.parse_args(argv)
    assert list(args.opts) == ["DATA.IMG_SIZE", "40", "DATA.BATCH_SIZE", "2"]
