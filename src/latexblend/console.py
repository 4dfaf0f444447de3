"""Progress on the console: a bar on a terminal; elsewhere (CI, a log file, a SLURM job) one plain line every
so often instead of a redraw per step, so a log stays readable."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def interactive() -> bool:
    """Is standard error a terminal (where a progress bar redraws in place)?"""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class Progress:
    """A counter shown as a tqdm bar on a terminal; off a terminal, ``lines`` prints ``desc: n/total unit
    (rate/s)`` every ``every`` updates (about ten lines a run by default) and at the end. ``enabled`` False
    shows nothing. :meth:`write` prints a line either way (above the bar on a terminal)."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 lines: bool = True, every: int | None = None):
        bar = enabled and interactive()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not bar)
        self.lines = enabled and lines and not bar
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = every or max(1, (total - initial) // 10)
        self.start, self.t0 = initial, time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.bar.update(k)
        self.n += k
        if self.lines and ((self.n - self.start) % self.every == 0 or self.n == self.total):
            rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s)", file=sys.stderr,
                  flush=True)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def write(self, text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
