"""What `sweep run` shows while its local workers run: the live status table, not their logs.

On a terminal it is the `sweep status --watch` view (rich Live: header, one row per trial with a
progress bar for the running ones), redrawn every ``interval_s``. When stdout is not a terminal
(CI, a pipe, a log file) a redrawn table would be noise, so it prints one line per trial state
change instead (``trial 3 completed  final_eval_loss 4.412``). The workers' own output goes to
``<workdir>/worker-<i>.log`` (``sweep run -v`` streams it instead, with Ax's INFO lines).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.live import Live

from sweep.report import fmt_loss, load_view, make_console, render_status

log = logging.getLogger("sweep.run")


class RunView:
    def __init__(self, exp: Any, *, live: bool = True, interval_s: float = 2.0, console: Console | None = None) -> None:
        self.exp = exp
        self.console = console or make_console()
        self.enabled = live
        self.interval_s = interval_s
        self._live: Live | None = None
        self._last = 0.0
        self._states: dict[int, str] = {}

    def __enter__(self) -> RunView:
        if self.enabled and self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        self.tick(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.tick(force=True)
        if self._live is not None:
            self._live.__exit__(*exc)  # type: ignore[arg-type]
            self._live = None

    def tick(self, force: bool = False) -> None:
        """Redraw (or print the changes) if ``interval_s`` has passed since the last time."""
        if not self.enabled or (not force and time.monotonic() - self._last < self.interval_s):
            return
        self._last = time.monotonic()
        try:
            view = load_view(self.exp)
        except Exception as exc:  # noqa: BLE001 -- a view that cannot be read now is redrawn next tick
            log.warning("live view: could not read the experiment (%s); retrying", exc)
            return
        if self._live is not None:
            self._live.update(render_status(view))
            return
        for row in view.status.rows:
            if self._states.get(row.index) == row.state:
                continue
            self._states[row.index] = row.state
            loss = f"  {view.status.metric} {fmt_loss(row.loss, row.sem)}" if row.loss is not None else ""
            why = f"  ({row.reason.splitlines()[0][:120]})" if row.reason and row.state != "completed" else ""
            self.console.print(f"trial {row.index} {row.state.replace('_', '-')} [{row.phase}] {row.description}{loss}{why}",
                               highlight=False, markup=False)
