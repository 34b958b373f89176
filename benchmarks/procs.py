"""Run benchmark phases in fresh ``spawn`` processes and collect their results.

Every phase runs in a new interpreter (multiprocessing ``spawn`` context) so that no
state — imported modules aside — is shared with the writer or with earlier phases:
what a phase measures is what an independent application process would see.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Final, cast

CTX: Final = multiprocessing.get_context("spawn")


class PhaseError(RuntimeError):
    """A phase raised in its worker, died, or overran its timeout."""


def _child(conn: Connection, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Worker entry point: run ``func(*args)`` and send back ``("ok", result)``."""
    # langchain_community announces its sunset and LangChain's loads() its future
    # defaults on every use; the report is what matters here.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    try:
        result = func(*args)
        conn.send(("ok", result))
    except BaseException:  # report everything, including SystemExit, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_fresh(func: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """Run ``func(*args)`` in one fresh spawn process and return its result."""
    return run_concurrent(func, [args], timeout=timeout)[0]


def run_concurrent(
    func: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]], timeout: float = 300.0
) -> list[Any]:
    """Start one fresh process per argument tuple at once; return results in order.

    Raises:
        PhaseError: A worker raised (its traceback is in the message), exited without
            answering, or did not finish within ``timeout`` seconds (it is then killed).
    """
    procs: list[tuple[Any, Connection]] = []
    ok = False
    try:
        for args in arg_lists:
            parent_conn, child_conn = CTX.Pipe(duplex=False)
            proc = CTX.Process(target=_child, args=(child_conn, func, args), daemon=True)
            proc.start()
            child_conn.close()
            procs.append((proc, parent_conn))
        deadline = time.monotonic() + timeout
        # Wait for all workers at once: a worker that fails or dies is noticed at
        # once, not after the others (which may wait for it at a barrier forever).
        pending: dict[Any, tuple[int, Any]] = {
            conn: (k, proc) for k, (proc, conn) in enumerate(procs)
        }
        results: list[Any] = [None] * len(procs)
        while pending:
            remaining = deadline - time.monotonic()
            ready = wait(list(pending), timeout=max(0.0, remaining)) if remaining > 0 else []
            if not ready:
                raise PhaseError(f"{func.__name__} timed out after {timeout:.0f} s")
            for ready_conn in ready:
                conn = cast(Connection, ready_conn)
                k, proc = pending.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError as exc:
                    proc.join(5)
                    raise PhaseError(
                        f"{func.__name__} worker {k} died (exit code {proc.exitcode})"
                    ) from exc
                if status != "ok":
                    raise PhaseError(f"{func.__name__} failed in worker {k}:\n{payload}")
                results[k] = payload
        ok = True
        return results
    finally:
        for proc, conn in procs:
            conn.close()
            proc.join(10 if ok else 0)  # after a failure, the others may wait forever
            if proc.is_alive():
                proc.kill()
                proc.join()
