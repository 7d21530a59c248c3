"""A dependency-free progress bar: a live line on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress from `start` to `total`.

    warmup: how many first updates the rate behind the ETA leaves out (steps that compile
    take far longer than the others); until it has a rate the ETA shows "?".
    """

    def __init__(self, total: int, start: int = 0, stream=None, every: int = 25, enabled: bool = True,
                 warmup: int = 0):
        self.total = total
        self.start = start
        self.stream = stream or sys.stderr
        self.every = every
        self.enabled = enabled
        self.warmup = warmup
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_line = 0
        self._updates = 0
        self._origin = (self.t0, start)  # (time, step) the rate is measured from

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at `step`, from the rate since the warm-up updates; None before there is one."""
        now = time.perf_counter() if now is None else now
        t, s = self._origin
        if self._updates <= self.warmup or step <= s or now <= t:
            return None
        return (self.total - step) * (now - t) / (step - s)

    def update(self, step: int, fields: dict[str, str]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        self._updates += 1
        if self._updates == self.warmup:
            self._origin = (now, step)
        eta = self.eta(step, now)
        frac = step / self.total
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        line = f"step {step}/{self.total} [{bar}] {100 * frac:3.0f}%  {info}  eta {'?' if eta is None else _fmt(eta)}"
        if self.tty:
            self.stream.write("\r" + line[:200] + "\033[K")
            self.stream.flush()
        elif step == self.total or step - self._last_line >= self.every:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
