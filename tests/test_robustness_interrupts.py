"""Interrupts at any bytecode (issue 8, defect 2): real KeyboardInterrupts delivered
by SIGINT at random instants, and exceptions raised by an alarm signal handler,
land in a loop of cache calls that carries on after each one — as a REPL or a
notebook does.  Afterwards the lock must be free for this process and for others,
and nothing may look half-written.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _robust_helpers import (
    APPS_DIR,
    DIED_MID_WRITE,
    child_env,
    kill_process_group,
    log_lines,
    parse_result,
    read_line,
    run_helper,
)
from _samples import CacheFactory

LOCK_TIMEOUT_S = 0.5
STIMULUS_S = 4.0  # per variant; the loop also stops after MAX_INTERRUPTS
MAX_INTERRUPTS = 400
ACK_DEADLINE_S = 3.0


def _start_child(mode: str, cache_dir: Path, seed: int, stderr: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APPS_DIR / "interrupt_loop.py"), mode, "interrupts",
         str(cache_dir), str(seed), str(LOCK_TIMEOUT_S), str(STIMULUS_S), str(MAX_INTERRUPTS)],
        env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        bufsize=0, start_new_session=True,
    )


def _wait_byte(child: subprocess.Popen[bytes], expected: bytes, deadline_s: float,
               log: Path) -> bool:
    """Read one byte from the child by the deadline; True if it is ``expected``."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout.fileno()], [], [], deadline_s)
    if not ready:
        return False
    got = os.read(child.stdout.fileno(), 1)
    if got != expected:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        raise AssertionError(
            f"child said {got!r}, expected {expected!r} (exit {child.poll()}); its log:\n"
            f"{log.read_text(errors='replace')[-4000:]}"
        )
    return True


def _send_sigints(child: subprocess.Popen[bytes], seed: int, log: Path) -> dict[str, int]:
    """SIGINT the child at random instants, one at a time (each after the previous
    one was caught), until MAX_INTERRUPTS or STIMULUS_S."""
    rng = random.Random(seed)
    sent = unacked = 0
    end = time.monotonic() + STIMULUS_S
    while sent < MAX_INTERRUPTS and time.monotonic() < end:
        # A random delay places the interrupt at a random point of the child's
        # loop; it synchronises nothing (the ack below does).
        time.sleep(rng.uniform(0, 2e-3))
        os.kill(child.pid, signal.SIGINT)
        sent += 1
        if not _wait_byte(child, b"A", ACK_DEADLINE_S, log):
            # Swallowed (e.g. "Exception ignored" in a finaliser): send another.
            unacked += 1
    return {"sent": sent, "unacked": unacked}


def _read_result(child: subprocess.Popen[bytes], deadline_s: float) -> dict[str, Any]:
    assert child.stdout is not None
    end = time.monotonic() + deadline_s
    while True:
        line = read_line(child.stdout, max(0.1, end - time.monotonic()))
        if line.startswith(b"RESULT "):
            result: dict[str, Any] = parse_result(line.decode())
            return result


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sigint", "alarm"])
def test_interrupts_at_random_instants_leave_the_cache_usable(
    make_cache: CacheFactory, cache_dir: Path, tmp_path: Path, mode: str
) -> None:
    """Hundreds of interrupts (KeyboardInterrupt from SIGINT, or an exception from a
    SIGALRM handler) at random bytecodes of update/lookup/clear/flush/check/
    ``model.invoke``: afterwards the same process's next update is stored, a second
    process's update and clear() get the lock within lock_timeout (nothing skipped,
    no LockTimeoutError) while the first is still alive, ``check()`` finds nothing,
    and no "died mid-write" repair is logged for the living writer."""
    cache = make_cache("interrupts", lock_timeout=LOCK_TIMEOUT_S)
    seed = 8_000 + (0 if mode == "sigint" else 1)
    child_log = tmp_path / "child.log"
    sent: dict[str, int] = {}
    with child_log.open("wb") as stderr:
        child = _start_child(mode, cache_dir, seed, stderr)
    try:
        if mode == "sigint":
            assert _wait_byte(child, b"R", 30, child_log), "the child did not start"
            sent = _send_sigints(child, seed, child_log)
            assert child.stdin is not None
            child.stdin.write(b"stop\n")
        result = _read_result(child, deadline_s=30 + STIMULUS_S)
        # The first process is alive and keeps the cache open: whatever it holds now,
        # it still holds while the second process runs.
        assert child.poll() is None
        second, second_log = run_helper(
            "second_process_uses", "interrupts", str(cache_dir), LOCK_TIMEOUT_S, timeout_s=30
        )
        assert child.stdin is not None
        child.stdin.write(b"exit\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0, f"the child failed:\n{child_log.read_text()[-3000:]}"
    finally:
        kill_process_group(child)
    log = child_log.read_text(errors="replace")
    problems = cache.check()
    repairs = log_lines(log, DIED_MID_WRITE) + log_lines(second_log, DIED_MID_WRITE)
    summary = (
        f"{mode}: {result['caught']} interrupts survived in {result['iterations']} calls "
        f"(sent {sent}); errors in the loop {result['errors']}; final update skipped "
        f"{result['final_skipped']} stored {result['final_found']}; check in the child "
        f"{result['check'][:2]}; second process {second}; check now {problems[:2]}; "
        f"{len(repairs)} 'died mid-write' lines {repairs[:2]}"
    )
    if result["tracebacks"]:
        summary += "\n" + "\n".join(result["tracebacks"])
    print(summary)
    assert result["caught"] >= 100, summary  # the stimulus really happened
    assert result["wrong"] == [], summary
    assert result["final_skipped"] == 0 and result["final_updates"] == 1, summary
    assert result["final_found"], summary
    assert result["check"] == [], summary
    assert second["clear"] == "ok" and second["after_clear"], summary
    assert second["skipped"] == 0 and second["updates"] == 1 and second["found"], summary
    assert second["check"] == [], summary
    assert problems == [], summary
    assert repairs == [], summary
    # Only this child used the cache in the loop: a LockTimeoutError there means it
    # found its own lock leaked; "check problems" a half-done write left unrepaired.
    assert result["errors"] == {}, summary
