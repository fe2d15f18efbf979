"""Stop signals handled as Ctrl-C: SIGTERM (a job scheduler, `timeout`, `kill`) and SIGHUP (a closed
terminal) raise KeyboardInterrupt in the main process, so that a command stops as it does on Ctrl-C:
it cleans up after itself and says what it says then (what was kept, how to go on)."""
from __future__ import annotations

import signal

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop_as_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt from here on, as SIGINT does (a signal a process was
    started to ignore, as under nohup, stays ignored)."""
    for number in STOP_SIGNALS[1:]:
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _stop_as_interrupt)
