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
import sys
from typing import Any, Iterator, List, Optional

from distributed import lost_peer_message
from errors import TrainingError, UsageError, user_message
from logger import FILE_ONLY, LOGGER_NAME, close_log_files, create_logger
from models import ConfigError
from utils import ensure_writable_folder, missing_folders


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
    if os.getpid() != MAIN_PID:
        # A DataLoader worker. Ctrl-C reaches the whole process group: the main process stops the run and then its
        # workers, so a worker ignores it (raising here, in a worker still starting up, printed a traceback).
        # SIGTERM (multiprocessing stopping its children as the main process exits) ends the worker at once.
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
    """A DataLoader ``worker_init_fn``. A main process that stops (Ctrl-C, SIGTERM) while a worker hands it a batch
    closes the connection mid-handshake, and the worker's sharing thread would print the broken pipe as a
    traceback after the run's one-line stop message; such errors are that stop, not news."""
    report = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError, EOFError)):
            report(kind, value, traceback)
    sys.excepthook = excepthook


def stop_on_signals() -> None:
    """Route SIGTERM and SIGINT to :func:`exit_on_signal`; called once by an entry point, before anything runs."""
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, exit_on_signal)


def leaving() -> None:
    """Once a process run by an entry point is on its way out (a stop logged, or exiting): a SIGTERM landing now
    (torchrun stopping the ranks after this one failed) is what is happening anyway, so it is ignored instead of
    raising inside clean-up or exit handlers and printing their traceback; Ctrl-C still ends the process at once.
    A no-op where :func:`stop_on_signals` did not install the handlers (a test calling ``main`` in process).

    torchrun stops a rank's whole process group: its DataLoader workers die with it, and the SIGCHLD handler the
    DataLoader installed would raise for each of them inside the loader's ``__del__``, printing one traceback per
    worker after the stop line. A dead worker is no news once the process leaves: SIGCHLD is ignored from then on
    (by a handler that does nothing: ``SIG_DFL`` with a SIGCHLD pending makes Python raise)."""
    if signal.getsignal(signal.SIGTERM) is not exit_on_signal:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))


def remove_failed_start(folder: str, log_file: str, created: List[str], logger: logging.Logger) -> None:
    """Undo what a run refused for bad input created: its new log, and the folders it made for it, when nothing
    else was written there (other ranks' logs aside). An earlier run's folder keeps its log, with the
    ``stopped:`` line appended."""
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
    """The output folder of one process of a run: checked writable, locked, and logged to; a failure inside ends
    in the log as one ``stopped:`` line (errors the user can act on) or a traceback (anything else); a
    :class:`Terminated` passes through, its handler has logged it already.

    A run refused for bad input (a usage or config error) before it wrote anything but its log leaves no trace:
    the log and folders it created are removed again, the error having gone to the console."""
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
