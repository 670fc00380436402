"""A dependency-free progress line for a training stage.

On a TTY one line is redrawn in place:
`sft  120/400  30%  12.3 it/s  ETA 0:00:23  train/loss=2.31`.
Elsewhere (CI logs, files) a plain line is printed at most every
`log_every_s` seconds, plus one for the final step.
"""

from __future__ import annotations

import collections
import datetime
import numbers
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

_TTY_REFRESH_S = 0.1  # redraw cap: writing to a terminal every step is slow
_RATE_WINDOW = 50  # updates used to estimate it/s, so compile time fades out


def _format_value(v: Any) -> str:
  if isinstance(v, numbers.Integral):
    return str(int(v))
  try:
    return f"{float(v):.4g}"
  except (TypeError, ValueError):
    return str(v)


class Progress:
  """Reports `step/total`, rate, ETA and a few metrics for one stage."""

  def __init__(
      self,
      stage: str,
      total_steps: int,
      start_step: int = 0,
      stream: TextIO | None = None,
      enabled: bool = True,
      log_every_s: float = 30.0,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.stage = stage
    self.total_steps = int(total_steps)
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled
    self.log_every_s = log_every_s
    self._clock = clock
    isatty = getattr(self.stream, "isatty", None)
    self._tty = bool(isatty and isatty())
    self._history = collections.deque(maxlen=_RATE_WINDOW)
    self._history.append((clock(), int(start_step)))
    self._step = int(start_step)
    self._metrics: Mapping[str, Any] = {}
    self._last_print = -float("inf")
    self._printed_step: int | None = None

  def rate(self) -> float | None:
    """Steps per second over the recent window, or None before two updates."""
    (t0, s0), (t1, s1) = self._history[0], self._history[-1]
    if t1 <= t0 or s1 <= s0:
      return None
    return (s1 - s0) / (t1 - t0)

  def line(self) -> str:
    """The current progress text (without newline or carriage return)."""
    parts = [self.stage, f"{self._step}/{self.total_steps}"]
    if self.total_steps > 0:
      parts.append(f"{100 * self._step // self.total_steps}%")
    rate = self.rate()
    if rate is None:
      parts += ["? it/s", "ETA ?"]
    else:
      eta = max(self.total_steps - self._step, 0) / rate
      parts += [f"{rate:.3g} it/s", f"ETA {datetime.timedelta(seconds=round(eta))}"]
    text = "  ".join(parts)
    if self._metrics:
      text += "  " + " ".join(f"{k}={_format_value(v)}" for k, v in self._metrics.items())
    return text

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Records `step` (and optional host-side metrics) and redraws if due."""
    if not self.enabled:
      return
    now = self._clock()
    self._step = int(step)
    self._history.append((now, self._step))
    if metrics is not None:
      self._metrics = dict(metrics)
    interval = _TTY_REFRESH_S if self._tty else self.log_every_s
    if now - self._last_print >= interval or self._step >= self.total_steps:
      self._print(now)

  def _print(self, now: float) -> None:
    text = self.line()
    if self._tty:
      width = shutil.get_terminal_size().columns
      # Clipped to the width because a wrapped line cannot be redrawn by \r.
      self.stream.write("\r" + text[: max(width - 1, 1)] + "\x1b[K")
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    self._last_print = now
    self._printed_step = self._step

  def close(self) -> None:
    """Prints the final state (if not shown yet) and ends the line."""
    if not self.enabled:
      return
    if self._printed_step != self._step:
      self._print(self._clock())
    if self._tty:
      self.stream.write("\n")
      self.stream.flush()
    self.enabled = False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
