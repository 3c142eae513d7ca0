"""When a long loop reports, and how long it has left: one helper for training, evaluation, throughput and the
dense tasks, so that no loop stays silent for minutes between its ``PRINT_FREQ`` lines."""
from __future__ import annotations

import datetime
import time
from typing import Optional

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
