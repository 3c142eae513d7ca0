"""Process-group setup from the torchrun environment, and the few collectives training and evaluation need.

A plain ``python main.py`` is a world of one: no process group is created and every helper is a no-op, so the
same code path serves one process and many.
"""
from __future__ import annotations

import inspect
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from errors import UsageError



@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and which device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` fails clearly when there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group when there are several."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"environment: RANK {rank} and WORLD_SIZE {world_size} need 0 <= RANK < WORLD_SIZE")
    env = DistEnv(rank, world_size, local_rank, resolve_device(device, local_rank))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UsageError(f"WORLD_SIZE={world_size} asks for a distributed run, but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: start it with torchrun (which sets "
                             f"them), or set MASTER_ADDR and MASTER_PORT on every process")
        join_process_group("nccl" if env.device.type == "cuda" else "gloo", rank, world_size)
        gather_peers()
    return env


def join_process_group(backend: str, rank: int, world_size: int) -> None:
    """``init_process_group`` in a helper thread while the main thread waits.

    The rendezvous blocks in C++ until every rank has arrived (by default for 30 minutes), and Python runs signal
    handlers only in the main thread between bytecodes: called directly, a job missing a rank could not be stopped
    with SIGTERM or Ctrl-C. Waiting in short joins keeps the main thread able to run them.
    """
    if rank == 0:
        print(f"waiting for {world_size} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"({backend})", flush=True)
    failure: list = []

    def join() -> None:
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        except BaseException as err:  # handed to the main thread
            failure.append(err)

    thread = threading.Thread(target=join, name="rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if failure:
        raise failure[0]


# (host, pid) of every rank, gathered once the group is joined: after a collective fails, which peers on this host
# have ended tells the user which rank died (gloo only reports a reset connection to an address).
PEERS: List[Tuple[str, int]] = []


def gather_peers() -> None:
    PEERS[:] = [("", 0)] * dist.get_world_size()
    dist.all_gather_object(PEERS, (socket.gethostname(), os.getpid()))


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie not yet reaped by torchrun."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True
    except OSError:
        return False


# How gloo and NCCL word a collective whose peer went away.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
             "Socket Timeout")


def lost_peer_message(err: BaseException) -> Optional[str]:
    """For a collective that failed because another rank died: one line saying which (when it ran on this host)
    and how to go on; None for any other error."""
    if not (dist.is_initialized() and PEERS) or not isinstance(err, RuntimeError):
        return None
    if not any(text in str(err) for text in PEER_LOST):
        return None
    rank, host = dist.get_rank(), socket.gethostname()
    neighbours = {r: pid for r, (peer_host, pid) in enumerate(PEERS) if r != rank and peer_host == host}
    dead: List[str] = []
    deadline = time.monotonic() + 1.0  # a killed peer's socket can close before its process has finished ending
    while neighbours and not dead and time.monotonic() < deadline:
        dead = [f"rank {r} (pid {pid})" for r, pid in neighbours.items() if _ended(pid)]
        time.sleep(0.05)
    who = f"{', '.join(dead)} ended" if dead else "another rank ended or became unreachable"
    return (f"rank {rank} lost its connection to the other ranks: {who}. torchrun stops the job; the same command "
            f"resumes from the newest checkpoint in the output folder")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes in place (identity in a world of one) and return the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_ddp(model: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP without syncing buffers in every forward pass (ours are the same on every rank). Newer torch spells this
    ``forward_sync_buffers=False`` and warns (FutureWarning) about the older ``broadcast_buffers=False``."""
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)
