"""Model calls under concurrent bursts: K distinct prompts x N concurrent callers.

Every caller is its own ``spawn`` process with the peer cache set as the model's
cache.  The callers wait at a barrier, then ask the same prompt at the same time,
prompt after prompt.  A cache without request coalescing pays N model calls per
prompt (each caller misses before any of them stores); shmcache pays one.  Each
real model call appends a line to a file, so the counts are exact whatever the
timing; wall time is the burst's, from the barrier to the last answer.

Run: ``python -m benchmarks.burst [--callers 8] [--prompts 4] [--delay 0.2]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from benchmarks.peers import Capacity, PeerSpec, Skip, close_cache, open_cache, prepared

# shmcache twice: as shipped, and with coalescing off (what every other peer does).
PEERS: tuple[str, ...] = (
    "shmcache",
    "shmcache-nocoalesce",
    "inmemory",
    "lmdb-nosync",
    "warp-cache",
    "diskcache",
    "sqlite",
    "redis",
)


class SlowModel(BaseChatModel):
    """A chat model that takes ``delay`` seconds and logs every real call to a file."""

    calls_file: str
    delay: float

    @property
    def _llm_type(self) -> str:
        return "burst-bench"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        time.sleep(self.delay)
        with open(self.calls_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        text = f"answer to {messages[-1].content}"
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


def _caller(
    spec: PeerSpec,
    coalesce: bool,
    calls_file: str,
    delay: float,
    prompts: Sequence[str],
    barrier: Any,
    out: Any,
) -> None:
    if spec.peer_id == "shmcache" and not coalesce:
        from shmcache import SharedMemoryCache

        opts = spec.options
        cache: Any = SharedMemoryCache(
            opts["name"], size_bytes=opts["size"], directory=opts["directory"], coalesce=False
        )
    else:
        cache = open_cache(spec)
    model = SlowModel(calls_file=calls_file, delay=delay, cache=cache)
    wrong = errors = 0
    barrier.wait(timeout=120)
    for prompt in prompts:
        try:
            wrong += model.invoke(prompt).content != f"answer to {prompt}"
        except Exception:  # a peer's own failure under concurrency (SQLiteCache's)
            errors += 1
    out.put((os.getpid(), time.monotonic(), wrong, errors))
    close_cache(cache)


def run_peer(peer: str, callers: int, prompts: int, delay: float, tmp: str) -> dict[str, Any]:
    """One burst on one peer: model calls, wall time, wrong answers."""
    peer_id = "shmcache" if peer.startswith("shmcache") else peer
    coalesce = peer != "shmcache-nocoalesce"
    texts = [f"burst prompt {i} for {peer}" for i in range(prompts)]
    ctx = mp.get_context("spawn")
    try:
        with prepared(peer_id, Capacity(entries=prompts * 4, value_bytes=256), tmp) as spec:
            calls_file = os.path.join(tmp, f"{peer}.calls")
            open(calls_file, "w").close()
            barrier = ctx.Barrier(callers + 1)
            out = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_caller,
                    args=(spec, coalesce, calls_file, delay, texts, barrier, out),
                )
                for _ in range(callers)
            ]
            for proc in procs:
                proc.start()
            try:
                barrier.wait(timeout=180)  # every caller has imported and opened
                started = time.monotonic()
                results = [out.get(timeout=300) for _ in procs]
            finally:
                for proc in procs:
                    proc.join(30)
                    if proc.is_alive():
                        proc.kill()
            with open(calls_file) as f:
                calls = sum(1 for _ in f)
    except Skip as exc:
        return {"peer": peer, "skipped": str(exc)}
    return {
        "peer": peer,
        "callers": callers,
        "prompts": prompts,
        "model_calls": calls,
        "requests": callers * prompts,
        "wall_s": round(max(r[1] for r in results) - started, 3),
        "wrong": sum(r[2] for r in results),
        "errors": sum(r[3] for r in results),  # exceptions out of model.invoke
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=8, help="concurrent processes (N)")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts (K)")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per model call")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--json", action="store_true", help="one JSON line per peer")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
        for peer in args.peers.split(","):
            rows.append(run_peer(peer, args.callers, args.prompts, args.delay, tmp))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(
            f"| cache | model calls ({args.callers} callers x {args.prompts} prompts) "
            "| wall s | wrong answers | exceptions out of invoke |"
        )
        print("|---|---|---|---|---|")
        for row in rows:
            if "skipped" in row:
                print(f"| {row['peer']} | skipped: {row['skipped']} | | | |")
            else:
                print(
                    f"| {row['peer']} | {row['model_calls']} of {row['requests']} "
                    f"| {row['wall_s']} | {row['wrong']} | {row['errors']} |"
                )
    return 1 if any(row.get("wrong") for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
