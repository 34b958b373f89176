"""Gunicorn settings for the LangGraph node-cache demo (``gunicorn -c <this file>``).

``preload_app``: the master imports ``app.py``, which opens the
``SharedMemoryNodeCache`` and compiles the graph once; ``fork`` hands both to every
worker (respawned ones too). Every worker reads and writes the same segment, so the
graph's cached node runs once per distinct input on the whole host.

Knobs: ``SHMCACHE_LG_BIND`` (``127.0.0.1:8001``; ``unix:/path/to.sock`` works too),
``SHMCACHE_LG_WORKERS`` (3); the rest are read by ``app.py``. Command-line options
override this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent

wsgi_app = "app:application"
pythonpath = str(_HERE)
# A demo: reachable from this machine only.
bind = [os.environ.get("SHMCACHE_LG_BIND", "127.0.0.1:8001")]
workers = int(os.environ.get("SHMCACHE_LG_WORKERS", "3"))
preload_app = True
graceful_timeout = 5
# Gunicorn >= 24 opens a control socket under ~/.gunicorn by default; a demo does
# not need it (older versions ignore this unknown setting).
control_socket_disable = True


def worker_exit(server: Any, worker: Any) -> None:
    """Close the cache on the way out: the worker's counts go to the shared stats."""
    app = sys.modules.get("app")
    if app is not None:
        app.close_cache()


def on_exit(server: Any) -> None:
    """Close the master's cache (opened when it preloaded the app)."""
    worker_exit(server, None)
