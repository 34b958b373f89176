"""A LangChain callback in every run: a failed model call ends its caller's leases.

A worker whose model call raised usually lives on, so its waiters must not wait for
its death or for ``coalesce_timeout``.  langchain_core's ``register_configure_hook``
adds the handler held by a context variable to every run's callback manager; the
variable's *default* is the handler, so it is there in every thread and task without
any set-up.  ``run_inline`` makes async runs call it in the failing caller's own
task (a cancelled task reports no error: task done-callbacks cover that case).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.context import register_configure_hook

__all__ = ["LeaseReleaseHandler", "install"]

logger = logging.getLogger("shmcache")


class LeaseReleaseHandler(BaseCallbackHandler):
    """Ends the failing caller's leases in every open cache of this process."""

    run_inline = True
    raise_error = False

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        try:
            self._release()
        except Exception:  # a callback must never turn one failure into two
            logger.debug("could not release leases after a failed model call", exc_info=True)


_installed: list[ContextVar[BaseCallbackHandler | None]] = []


def install(release: Callable[[], None]) -> None:
    """Put a :class:`LeaseReleaseHandler` into every LangChain run (once per process)."""
    if _installed:
        return
    # A default, not .set(): a set value would be seen only in this thread's context.
    var: ContextVar[BaseCallbackHandler | None] = ContextVar(
        "shmcache_lease_release", default=LeaseReleaseHandler(release)  # noqa: B039
    )
    register_configure_hook(var, inheritable=True)
    _installed.append(var)
