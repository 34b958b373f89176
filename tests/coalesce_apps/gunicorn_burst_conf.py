"""Gunicorn settings of the server coalescing tests (``gunicorn -c <this file>``).

With ``BURST_OPEN=post_fork`` each worker opens the cache in ``post_fork``; with
``import`` (and ``--preload``) the master opened it.  Either way each worker, once
ready, appends its pid to ``BURST_READY_FILE``, so the test sends its burst only when
every worker can take a request.
"""

from __future__ import annotations

import os
import sys
from typing import Any

graceful_timeout = 5
# Gunicorn >= 24 opens a control socket under ~/.gunicorn by default: not needed.
control_socket_disable = True


def post_fork(server: Any, worker: Any) -> None:
    from coalesce_support import append_line

    if os.environ.get("BURST_OPEN") == "post_fork":
        import burst_app

        burst_app.open_cache()
    append_line(os.environ["BURST_READY_FILE"], {"pid": os.getpid()})


def worker_exit(server: Any, worker: Any) -> None:
    app = sys.modules.get("burst_app")
    if app is not None:
        app.close_cache()
