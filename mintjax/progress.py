"""Progress bars for mintjax's long steps (one library: tqdm).

Owns `bar(...)`, the one way a long step (conversion, warm-up compiles,
training steps, evaluation, batch serving, benchmarks) shows progress, and
`enabled()`, the switch that turns every bar off.

Why tqdm: it is already installed with mintjax (the `gguf` reader depends on
it), so bars cost no extra dependency; it is small, well kept, draws to
stderr (stdout stays clean for results and JSON), and degrades to periodic
plain lines when stderr is not a terminal (CI logs, pipes). `rich` draws
nicer bars but would be a new direct dependency for the same job.

Bars go to stderr. They are off when `MINTJAX_PROGRESS=0`, and refresh at
most every 0.5 s on a terminal, every 10 s into a log file (a log gets a
few lines, not thousands).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

import tqdm

T = TypeVar("T")

ENV = "MINTJAX_PROGRESS"  # '0' turns every bar off


def enabled() -> bool:
  """Whether bars are drawn (`MINTJAX_PROGRESS` is not '0')."""
  return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None,
        desc: str = "", unit: str = "it", leave: bool = True,
        initial: int = 0, disable: bool = False) -> tqdm.tqdm:
  """A progress bar over `iterable` (or a manual one of `total` steps).

  Use it as an iterator (`for x in bar(xs, desc=...)`) or as a context
  manager with `.update(n)` and `.set_postfix(...)` for loss, tokens/s etc.

  Args:
    iterable: what to iterate; None for a manual bar.
    total: number of steps (defaults to len(iterable) when it has one).
    desc: what the step is doing, e.g. 'warm-up compiles'.
    unit: what one step is ('step', 'request', 'file').
    leave: keep the finished bar on screen.
    initial: steps already done (a resumed run).
    disable: hide this bar (e.g. on processes other than 0).
  """
  tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                   initial=initial,
                   file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5 if tty else 10.0,
                   disable=disable or not enabled())
