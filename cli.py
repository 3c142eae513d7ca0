"""What the entry points' command lines share: the ``--help`` format, and the flags of every training run."""
from __future__ import annotations

import argparse
from typing import Optional, Tuple

from choices import AMP_MODES, DEVICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help where the default is a value; flags whose default is unset (the
    config's value applies, named in their help) or off show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def run_parser(prog: Optional[str], description: str, data_help: str) -> Tuple[argparse.ArgumentParser,
                                                                                 argparse._MutuallyExclusiveGroup]:
    """The flags every training entry point takes (``main.py`` and the dense tasks), each setting the config key
    ``config.KEY_FLAGS`` / ``config.SWITCHES`` map it to; and the group of run modes (``--eval``), to which an
    entry point adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--opts", nargs="+", action="extend", default=None, metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.NUM_WORKERS 4")
    parser.add_argument("--batch-size", type=int, help="batch size per process (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", help=data_help)
    parser.add_argument("--pretrained", metavar="FILE", help="initial weights only (e.g. a released checkpoint)")
    parser.add_argument("--resume", metavar="FILE", help="checkpoint to continue training from, or to evaluate")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="DANGEROUS: also load checkpoints that need full unpickling (not tensors only); "
                             "unpickling runs any code the file carries, so use it only for files you trust")
    parser.add_argument("--accumulation-steps", type=int,
                        help="batches per optimizer update (TRAIN.ACCUMULATION_STEPS)")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--model-ema", action="store_true",
                        help="keep an exponential moving average of the weights (MODEL_EMA, decay MODEL_EMA_DECAY)")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile the model for training and evaluation (COMPILE; default backend "
                             "inductor)")
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument("--amp", choices=AMP_MODES,
                     help="autocast precision (default: bf16 on GPUs that support it, else fp16 with a gradient scaler "
                          "on CUDA; none on CPU)")
    amp.add_argument("--disable-amp", action="store_true", help="same as --amp none")
    parser.add_argument("--output", metavar="PATH", help="output root; the run writes to <output>/<model>/<tag>")
    parser.add_argument("--tag", help="experiment tag (default: 'default')")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write losses, learning rate, gradient norm and scores as TensorBoard events to the "
                             "run's output folder (TENSORBOARD; needs `pip install tensorboard`)")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU")
    # torch.distributed.launch passes --local-rank as well as setting LOCAL_RANK, which distributed.py reads: the
    # flag is accepted so that such launches parse, and otherwise ignored.
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--eval", action="store_true", help="evaluate only")
    return parser, modes
