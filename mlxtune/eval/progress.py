"""Progress of a long evaluation phase (scoring, generating): a tqdm bar on a terminal, else a line per N examples.

`stderr_log` is the logger `mlxtune eval` passes; only with it, and only when stderr is a terminal, is a bar drawn
(a notebook's own `log` gets the lines).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    """Print a progress line to stderr (the CLI's logger)."""
    print(msg, file=sys.stderr, flush=True)


def null_log(msg: str) -> None:
    """Discard a progress line."""


class Progress:
    """Counts the examples a phase has done: `update(n)`, `iter(batches)`; `close()` ends the bar.

    With `log is stderr_log` on a terminal a tqdm bar; otherwise a line `  scoring: 40/100 examples (3.1s)` every
    `every` examples (default a tenth of the total) and at the end; nothing with `null_log`.
    """

    def __init__(self, total: int, desc: str, log: Log, *, every: Optional[int] = None, tty: Optional[bool] = None):
        self.total, self.desc, self.log, self.done = total, desc, log, 0
        self.every = every or max(1, math.ceil(total / 10))
        self._next = self.every
        self._t0 = time.perf_counter()
        self.bar = None
        if tty is None:
            tty = log is stderr_log and sys.stderr.isatty()
        if tty and log is not null_log:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.done >= self._next or self.done >= self.total:
            self.log(f"  {self.desc}: {self.done}/{self.total} examples ({time.perf_counter() - self._t0:.1f}s)")
            while self._next <= self.done:
                self._next += self.every

    def iter(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches, counting each one's rows (examples) once it has been consumed."""
        for b in batches:
            yield b
            self.update(len(b.inputs))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
