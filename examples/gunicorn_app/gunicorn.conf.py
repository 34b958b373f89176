"""Gunicorn settings for the shmcache demo app (``gunicorn -c <this file>``).

Two ways to give pre-forked workers a shared cache, chosen by
``SHMCACHE_DEMO_DEPLOY``:

* ``preload`` (default): ``preload_app = True``. The master imports ``app.py``,
  which opens the cache once; ``fork`` hands it to every worker. Workers start
  faster (the model and LangChain are imported once) and a respawned worker is
  ready at once.
* ``post_fork``: the app is imported in each worker, and the ``post_fork`` hook
  below opens the cache there. Use it when the app must not be loaded in the
  master (e.g. ``--reload``, or libraries that are not fork-safe).

Either way every worker attaches to the same segment, so the model runs once per
distinct prompt on the whole host, even for a burst of identical first requests
(``burst.py``). Other knobs: ``SHMCACHE_DEMO_PORT`` (8000), ``SHMCACHE_DEMO_WORKERS``
(3); command-line options override this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
DEPLOY = os.environ.get("SHMCACHE_DEMO_DEPLOY", "preload")
if DEPLOY not in ("preload", "post_fork"):
    raise ValueError(f"SHMCACHE_DEMO_DEPLOY must be 'preload' or 'post_fork', not {DEPLOY!r}")

wsgi_app = "app:application"
# app.py lives here and imports fake_model.py from the directory above.
pythonpath = f"{_HERE},{_HERE.parent}"
# A demo: reachable from this machine only.
bind = [f"127.0.0.1:{os.environ.get('SHMCACHE_DEMO_PORT', '8000')}"]
workers = int(os.environ.get("SHMCACHE_DEMO_WORKERS", "3"))
preload_app = DEPLOY == "preload"
graceful_timeout = 5
# Gunicorn >= 24 opens a control socket under ~/.gunicorn by default; a demo does
# not need it (older versions ignore this unknown setting).
control_socket_disable = True


def post_fork(server: Any, worker: Any) -> None:
    """Open the cache in the new worker (``post_fork`` style only)."""
    if DEPLOY == "post_fork":
        import app  # the worker imports it next anyway: this only comes first

        app.open_cache()


def worker_exit(server: Any, worker: Any) -> None:
    """Close the cache on the way out: the worker detaches and frees its counter slot."""
    app = sys.modules.get("app")
    if app is not None:
        app.close_cache()


def on_exit(server: Any) -> None:
    """Close the master's cache (opened at import in ``preload`` style)."""
    worker_exit(server, None)
