"""How a run holds its output folder and how it stops.

One run per output folder: a second run started on the same ``--output``/``--tag`` would overwrite the first
one's checkpoints and config and interleave its log, so it is refused instead. SIGTERM (torchrun stopping the
ranks) and SIGINT (Ctrl-C) end a run through Python, logged in one line. ``main.py`` and ``dense/run.py`` share
both."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
from typing import Any, Iterator, Optional

from errors import TrainingError, UsageError, user_message
from logger import LOGGER_NAME, create_logger
from models import ConfigError
from utils import ensure_writable_folder


class OutputLock:
    """An exclusive POSIX record lock (``lockf``) on ``<folder>/.lock_rank<rank>``, held while the run lives.

    The lock belongs to the process, not to the file descriptor, so DataLoader workers forked from the run do not
    inherit it (an orphaned worker of a killed run would otherwise hold an ``flock`` for a while). The kernel
    drops it when the process ends, however it ends, so a crashed or killed run never leaves the folder locked: a
    lock file left behind by a killed run is simply locked anew. A run that ends normally removes the file (while
    still holding the lock), so finished output folders hold no trace of it. The file holds the owner's pid, for
    the message.
    """

    def __init__(self, folder: str, rank: int):
        self.folder = folder
        self.path = os.path.join(folder, f".lock_rank{rank}")
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"--output: {self.folder} is in use by another run (pid {owner}); wait for it to "
                                 f"end, or choose another --output or --tag") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous owner removed the file between our open and lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.remove(self.path)
            os.close(self._fd)  # releases the lock
            self._fd = None


class Terminated(SystemExit):
    """SIGTERM or SIGINT, turned into an exception by :func:`exit_on_signal`, which has logged it already; the
    exit status is 128 + the signal number, as a shell reports a process killed by it."""


# The process that installed the handlers; DataLoader workers fork from it and inherit them.
MAIN_PID = os.getpid()


def exit_on_signal(signum: int, frame: Any) -> None:
    """torchrun stops every rank with SIGTERM when one fails, and Ctrl-C sends SIGINT: either way the process
    exits through Python (clean-up runs) after logging one line. Waiting for the other ranks is interruptible
    too (see ``distributed.init_distributed``).

    The reason is logged here rather than where the exception is caught: the signal often lands just as a
    collective fails on the lost rank, and Python runs the handler at its next call, which may be the logging
    call for that failure; the exception raised there would skip both log lines.
    """
    if os.getpid() != MAIN_PID:  # a DataLoader worker: its loop ends quietly on KeyboardInterrupt
        raise KeyboardInterrupt
    name = signal.Signals(signum).name
    reason = ("interrupted (Ctrl-C)" if signum == signal.SIGINT
              else f"terminated by {name} (under torchrun: another rank failed)")
    logging.getLogger(LOGGER_NAME).error(f"stopped: {reason}")
    raise Terminated(128 + signum)


def stop_on_signals() -> None:
    """Route SIGTERM and SIGINT to :func:`exit_on_signal`; called once by an entry point, before anything runs."""
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, exit_on_signal)


@contextlib.contextmanager
def locked_run(folder: str, rank: int) -> Iterator[logging.Logger]:
    """The output folder of one process of a run: checked writable, locked, and logged to; a failure inside ends
    in the log as one ``stopped:`` line (errors the user can act on) or a traceback (anything else); a
    :class:`Terminated` passes through, its handler has logged it already."""
    ensure_writable_folder(folder, "--output")
    with OutputLock(folder, rank):
        logger = create_logger(folder, rank)
        try:
            yield logger
        except Terminated:
            raise
        except (UsageError, ConfigError, TrainingError, SystemExit) as err:
            logger.error(f"stopped: {user_message(err)}")
            raise
        except BaseException:
            logger.exception("failed")
            raise
