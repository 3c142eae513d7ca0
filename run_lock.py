"""One run per output folder: a second run started on the same ``--output``/``--tag`` would overwrite the
first one's checkpoints and config and interleave its log, so it is refused instead."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator, Optional

from errors import TrainingError, UsageError, user_message
from logger import create_logger
from models import ConfigError
from utils import ensure_writable_folder


class OutputLock:
    """An exclusive POSIX record lock (``lockf``) on ``<folder>/.lock_rank<rank>``, held while the run lives.

    The lock belongs to the process, not to the file descriptor, so DataLoader workers forked from the run do not
    inherit it (an orphaned worker of a killed run would otherwise hold an ``flock`` for a while). The kernel
    drops it when the process ends, however it ends, so a crashed or killed run never leaves the folder locked: a lock file left behind by a killed run is simply locked anew. A run that ends normally removes
    the file (while still holding the lock), so finished output folders hold no trace of it. The file holds the
    owner's pid, for the message.
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


@contextlib.contextmanager
def locked_run(folder: str, rank: int, terminated: type) -> Iterator[logging.Logger]:
    """The output folder of one process of a run: checked writable, locked, and logged to; a failure inside ends
    in the log as one ``stopped:`` line (errors the user can act on) or a traceback (anything else). ``terminated``
    (the signal handler's exception) is passed through: the handler has logged it already."""
    ensure_writable_folder(folder, "--output")
    with OutputLock(folder, rank):
        logger = create_logger(folder, rank)
        try:
            yield logger
        except terminated:
            raise
        except (UsageError, ConfigError, TrainingError, SystemExit) as err:
            logger.error(f"stopped: {user_message(err)}")
            raise
        except BaseException:
            logger.exception("failed")
            raise
