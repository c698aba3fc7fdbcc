"""Stopping a command. Ctrl-C raises KeyboardInterrupt; SIGTERM (a scheduler's stop, `timeout`, `ray job
stop`) raises `Terminated`, a KeyboardInterrupt too, so both take one path: `finally` blocks release the run
lock and print where a re-run continues, and the CLI exits 130 or 143. `raydiff` installs the SIGTERM
handler for the whole command, so a stop before training starts is handled as one during it."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command: it stops as on Ctrl-C."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports it


def raise_on_sigterm():
    """Make SIGTERM raise `Terminated` in this thread; returns the handler to restore (None off the main
    thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated

    return signal.signal(signal.SIGTERM, handler)
