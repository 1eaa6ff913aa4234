"""The stance of vlserve's child processes (the engine core, TP/PP workers) on stop signals.

A service manager stops a unit by signalling its whole process group (systemd: SIGTERM to every
process; a terminal: SIGINT on Ctrl-C). Only the API server may act on that: it stops accepting,
drains in-flight requests (--drain-timeout) and then tells the engine core to leave, which tells
its workers. A child that died on the group's signal would fail the requests being drained, so
children ignore both signals and leave when told, or when their parent's pipe closes (the parent
is gone). Callers: engine.core_host.core_process_main, engine.executor.multiproc.worker_process_main.
"""

from __future__ import annotations

import signal


def ignore_group_stop_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
