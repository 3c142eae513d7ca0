"""How a run holds its output folder (one run per folder: a second would overwrite the first one's checkpoints and
interleave its log) and how it stops (SIGTERM and SIGINT end it through Python, logged in one line)."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
from typing import Any, Iterator, List, Optional

from distributed import lost_peer_message
from errors import TrainingError, UsageError, user_message
from logger import FILE_ONLY, LOGGER_NAME, close_log_files, create_logger
from models import ConfigError
from utils import ensure_writable_folder, missing_folders


class OutputLock:
    """An exclusive POSIX record lock (``lockf``) on ``<folder>/.lock_rank<rank>``, held while the run lives.

    A ``lockf`` lock belongs to the process, so forked DataLoader workers do not inherit it, and the kernel drops
    it however the process ends: a killed run's lock file is simply locked anew. A run that ends normally removes
    the file. It holds the owner's pid, for the message.
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
    """SIGTERM or SIGINT, logged already by :func:`exit_on_signal`; exit status 128 + the signal number."""


# The process that installed the handlers; DataLoader workers fork from it and inherit them.
MAIN_PID = os.getpid()


def exit_on_signal(signum: int, frame: Any) -> None:
    """Exit through Python (clean-up runs) after logging one line. The reason is logged here, not where the
    exception is caught: the signal often lands as a collective fails, and the handler may run inside the logging
    call for that failure, whose exception would skip both lines."""
    if os.getpid() != MAIN_PID:
        # A DataLoader worker: Ctrl-C reaches the whole process group and the main process stops its workers, so
        # a worker ignores it; SIGTERM (multiprocessing stopping its children) ends the worker at once.
        if signum != signal.SIGINT:
            os._exit(128 + signum)
        return
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        reason = "interrupted (Ctrl-C)"
    elif os.environ.get("TORCHELASTIC_RUN_ID"):  # set by torchrun, which stops every rank when one fails
        reason = f"terminated by {name} (torchrun stops all ranks when one fails or is stopped)"
    else:
        reason = f"terminated by {name}"
    leaving()
    logging.getLogger(LOGGER_NAME).error(f"stopped: {reason}")
    raise Terminated(128 + signum)


def quiet_worker_teardown(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: a main process that stops while a worker hands it a batch breaks the pipe,
    which the worker would print as a traceback after the run's one-line stop message."""
    report = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError, EOFError)):
            report(kind, value, traceback)
    sys.excepthook = excepthook


def stop_on_signals() -> None:
    """Route SIGTERM and SIGINT to :func:`exit_on_signal`; called once by an entry point."""
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, exit_on_signal)


def leaving() -> None:
    """Once a process is on its way out, a SIGTERM (torchrun stopping the ranks after this one failed) is ignored
    instead of raising inside clean-up and printing a traceback; Ctrl-C still ends it at once. A no-op where
    :func:`stop_on_signals` did not install the handlers. torchrun stops a rank's whole process group, so its
    DataLoader workers die too and the loader's SIGCHLD handler would print a traceback per worker: SIGCHLD gets a
    handler that does nothing (``SIG_DFL`` with a SIGCHLD pending makes Python raise)."""
    if signal.getsignal(signal.SIGTERM) is not exit_on_signal:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))


def remove_failed_start(folder: str, log_file: str, created: List[str], logger: logging.Logger) -> None:
    """Undo what a run refused for bad input created (its new log and folders) when nothing else was written
    there; an earlier run's folder keeps its log, with the ``stopped:`` line appended."""
    if any(not name.startswith(("log_rank", ".lock_rank")) for name in os.listdir(folder)):
        return
    close_log_files(logger)
    with contextlib.suppress(FileNotFoundError):
        os.remove(log_file)
    for path in created:  # deepest first; one still holding another rank's log stays
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def locked_run(folder: str, rank: int) -> Iterator[logging.Logger]:
    """One process's output folder: checked writable, locked, and logged to. A failure ends in the log as one
    ``stopped:`` line (errors the user can act on) or a traceback; a run refused for bad input before it wrote
    anything but its log leaves no trace (the error has gone to the console)."""
    created = missing_folders(folder)
    ensure_writable_folder(folder, "--output")
    log_file = os.path.join(folder, f"log_rank{rank}.txt")
    new_log = not os.path.exists(log_file)
    refused = False
    try:
        with OutputLock(folder, rank):
            logger = create_logger(folder, rank)
            try:
                yield logger
            except Terminated:
                raise
            except BaseException as err:
                leaving()
                lost = lost_peer_message(err)  # None unless a collective broke because another rank died
                # The entry point prints the error itself (one line on stderr): the log file keeps its copy.
                if lost is not None:
                    logger.error(f"stopped: {lost}", extra=FILE_ONLY)
                    raise TrainingError(lost) from None
                if not isinstance(err, (UsageError, ConfigError, TrainingError, SystemExit)):
                    logger.exception("failed")
                    raise
                logger.error(f"stopped: {user_message(err)}", extra=FILE_ONLY)
                refused = isinstance(err, (UsageError, ConfigError))
                raise
    finally:
        if refused and new_log:  # the lock is released (its file gone) by now
            remove_failed_start(folder, log_file, created, logger)
