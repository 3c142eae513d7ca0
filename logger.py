"""Logging for one run: coloured console output on rank 0 only, a plain log file for every rank, optional
TensorBoard events, the progress lines of long loops (:class:`Progress`), and the one line a run stopped by
SIGTERM or Ctrl-C ends with (:func:`stop_on_signals`)."""
from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional

from termcolor import colored

from config import UsageError

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LOGGER_NAME = "focal"
# Libraries whose warnings belong in the run's log (e.g. timm's schedulers): without handlers of their own they
# would reach stderr as bare lines, outside the log and in no format of ours.
LIBRARY_LOGGERS = ("timm",)


class PrintableFormatter(logging.Formatter):
    """File names that are not valid UTF-8 reach Python as lone surrogates, which no stream can encode: logging
    would print "--- Logging error ---" and drop the message. Such characters are written as escapes instead."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


class HoldsNestedRecords(logging.Handler):
    """A stop signal's handler logs the stop line (:func:`exit_on_signal`), and the signal can land while this
    handler is flushing its stream: writing the line there re-enters the buffered stream, which refuses with
    "reentrant call", and logging prints a "--- Logging error ---" traceback instead of the line. A record arriving
    while this handler is writing waits until the interrupted write has unwound, and is written then."""

    _held: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
            return
        try:
            self._held = []
            super().emit(record)
        finally:
            held, self._held = self._held or [], None
            for nested in held:
                super().emit(nested)


# ``logger.error(..., extra=FILE_ONLY)``: a line for the log file alone, e.g. the error an entry point prints itself.
FILE_ONLY = {"file_only": True}


class ConsoleHandler(HoldsNestedRecords, logging.StreamHandler):
    """Rank 0's console lines (all but those logged with :data:`FILE_ONLY`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False) and super().filter(record)


class LogFileHandler(HoldsNestedRecords, logging.FileHandler):
    """Each rank's log file."""


def create_logger(output_dir: str, rank: int = 0, name: str = LOGGER_NAME) -> logging.Logger:
    """A logger writing to ``<output_dir>/log_rank<rank>.txt``, and to stdout on rank 0.

    Calling it again for the same name replaces the handlers, so repeated runs in one process do not duplicate lines.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()

    plain = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
    if rank == 0:
        console_fmt = (colored("[%(asctime)s %(name)s]", "green") + colored("(%(filename)s %(lineno)d)", "yellow")
                       + ": %(levelname)s %(message)s")
        console = ConsoleHandler(sys.stdout)
        console.setFormatter(PrintableFormatter(console_fmt, datefmt=DATE_FORMAT))
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = LogFileHandler(os.path.join(output_dir, f"log_rank{rank}.txt"), mode="a", encoding="utf-8")
    file_handler.setFormatter(PrintableFormatter(plain, datefmt=DATE_FORMAT))
    logger.addHandler(file_handler)
    if name == LOGGER_NAME:
        for library in LIBRARY_LOGGERS:
            route_to(logging.getLogger(library), logger)
    return logger


def close_log_files(logger: logging.Logger) -> None:
    """Close and detach ``logger``'s log files, and the libraries' routed to it, so that the files can be removed."""
    for owner in (logger, *map(logging.getLogger, LIBRARY_LOGGERS)):
        for handler in list(owner.handlers):
            if isinstance(handler, logging.FileHandler):
                owner.removeHandler(handler)
                handler.close()


def route_to(library: logging.Logger, logger: logging.Logger) -> None:
    """Send ``library``'s warnings and errors to ``logger``'s handlers (console and log file), and only there."""
    library.handlers = list(logger.handlers)
    library.setLevel(logging.WARNING)
    library.propagate = False


def create_tensorboard_writer(output_dir: str) -> Any:
    """torch's TensorBoard ``SummaryWriter`` into ``output_dir``. TensorBoard stays an optional dependency, so
    asking for it without the package installed is a usage error, not an import failure at start-up."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard (TENSORBOARD) needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=output_dir)


def scalars_to(writer: Any) -> Optional[Callable[[int, Dict[str, float]], None]]:
    """What the training loop calls with every update's values: each one a TensorBoard scalar at the update count,
    the axis evaluation scores are written at too."""
    if writer is None:
        return None

    def add(step: int, values: Dict[str, float]) -> None:
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    return add


# --- Progress of long loops ---------------------------------------------------------------------------------
# When a long loop reports, and how long it has left: one helper for training, evaluation, throughput and the
# tools, so that no loop stays silent for minutes between its PRINT_FREQ lines.

# A loop reports at least this often (seconds), whatever PRINT_FREQ says, once it has run that long.
REPORT_SECONDS = 10.0


def duration(seconds: float) -> str:
    """``0:03:25``: whole seconds, as the log lines write times."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Steps ``0 .. total-1`` of a loop: :meth:`due` says whether step ``idx`` (just finished) should be reported:
    the first, every ``every``-th, the last, and any step ``seconds`` after the previous report; :meth:`eta` is
    the time left at the mean pace of the steps so far."""

    def __init__(self, total: int, every: int, seconds: Optional[float] = None):
        self.total, self.every = total, max(every, 1)
        self.seconds = REPORT_SECONDS if seconds is None else seconds
        self.start = self.last = time.perf_counter()
        self.done = 0

    def due(self, idx: int) -> bool:
        self.done = idx + 1
        now = time.perf_counter()
        if idx % self.every == 0 or idx + 1 == self.total or now - self.last >= self.seconds:
            self.last = now
            return True
        return False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> str:
        return duration(self.elapsed() / max(self.done, 1) * (self.total - self.done))

    def position(self, idx: int) -> str:
        """``[idx/total] eta 0:01:10``, the start of a progress line."""
        return f"[{idx}/{self.total}] eta {self.eta()}"


# --- How a run stops ----------------------------------------------------------------------------------------
# SIGTERM and SIGINT end a run through Python, logged in one line.

class Terminated(SystemExit):
    """SIGTERM or SIGINT, logged already by :func:`exit_on_signal`; exit status 128 + the signal number."""


# The process that installed the handlers (set by stop_on_signals); DataLoader workers fork from it and inherit them.
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
    global MAIN_PID
    MAIN_PID = os.getpid()
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
