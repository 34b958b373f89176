#!/usr/bin/env python
"""Embeddings demo: a process pool shares one embedding cache in shared memory.

An indexing job over a pool of ``--workers`` processes, run twice with the same
code; only the store behind LangChain's ``CacheBackedEmbeddings`` differs:

1. *shard pass*: the corpus is split between the workers; each embeds its share.
2. *full pass*: every worker embeds the whole corpus (say, to build its own
   in-process search index, as each web worker of a RAG service would).

With ``InMemoryByteStore`` (LangChain's default, one per process) a worker only
finds the texts it embedded itself, so the full pass embeds the other workers'
shares again: ``workers x texts`` embeddings in all. With
``SharedMemoryByteStore`` every worker finds every vector, whoever computed it:
each text is embedded exactly once across the pool.

    python examples/embeddings_demo.py                 # about 3 s
    python examples/embeddings_demo.py --workers 8 --texts 200 --delay 0.002
    python examples/embeddings_demo.py --json          # summary as one JSON line

The embeddings model is a fake (no network): vectors are derived from a hash of
the text, and each text costs ``--delay`` seconds, like a remote provider.

Why a shard pass first? The byte store does not coalesce: two workers that miss
the same new text at the same moment both embed it (``SharedMemoryCache``, the
LLM cache, coalesces such misses; a ``ByteStore`` has no "I am computing this"
step). Splitting the first pass means no text is ever missed twice at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import multiprocessing.util
import os
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_classic.embeddings import CacheBackedEmbeddings
from langchain_core.embeddings import Embeddings
from langchain_core.stores import ByteStore, InMemoryByteStore

from shmcache import SharedMemoryByteStore

DIMENSIONS = 64
# The longest the pool's start-up, or a wait for the other workers, may take.
WAIT_TIMEOUT_S = 60.0


# --- the fake model ------------------------------------------------------------


def hash_vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The deterministic vector of ``text``: SHAKE-128 output read as floats in [-1, 1)."""
    digest = hashlib.shake_128(text.encode()).digest(2 * dimensions)
    return [v / 32768 for v in struct.unpack(f"<{dimensions}h", digest)]


class SlowHashEmbeddings(Embeddings):
    """A fake embeddings model: hash-based vectors, ``delay_s`` seconds per text.

    ``texts_embedded`` counts the texts this process's instance really embedded
    (cache hits never reach the model).
    """

    model = "slow-hash-64"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.texts_embedded = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        time.sleep(self.delay_s * len(texts))  # the provider's latency
        self.texts_embedded += len(texts)
        return [hash_vector(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def vectors_digest(vectors: Sequence[Sequence[float]]) -> str:
    """A short fingerprint of a list of vectors (equal vectors, equal digest)."""
    return hashlib.sha256(json.dumps(vectors).encode()).hexdigest()[:16]


# --- worker side -----------------------------------------------------------------

_model: SlowHashEmbeddings | None = None
_embedder: CacheBackedEmbeddings | None = None
_everyone: threading.Barrier | None = None


def _init_worker(
    shared: SharedMemoryByteStore | None, delay_s: float, everyone: threading.Barrier
) -> None:
    """Pool initializer: this worker's model, store and CacheBackedEmbeddings.

    ``shared`` arrives inherited (``fork``) or pickled by name (``spawn``,
    ``forkserver``); either way it is the same segment as the parent's. None:
    a store of this process's own, as without shmcache.
    """
    global _model, _embedder, _everyone
    store: ByteStore
    if shared is None:
        store = InMemoryByteStore()
    else:
        store = shared
        # Pool workers leave through os._exit(), which skips atexit; this finalizer
        # still runs, so the worker detaches and its counts reach the segment.
        multiprocessing.util.Finalize(None, shared.close, exitpriority=10)
    _model = SlowHashEmbeddings(delay_s)
    _embedder = CacheBackedEmbeddings.from_bytes_store(
        _model, store, namespace=f"{_model.model}:", key_encoder="sha256"
    )
    _everyone = everyone


def _embed(texts: list[str], wait_for_everyone: bool) -> dict[str, Any]:
    """Embed ``texts`` in a pool worker; report what this call cost the model.

    With ``wait_for_everyone`` the task first waits until every worker holds one
    such task, so each worker runs exactly one of them.
    """
    if _model is None or _embedder is None or _everyone is None:
        raise RuntimeError("the pool initializer did not run")
    if wait_for_everyone:
        _everyone.wait(WAIT_TIMEOUT_S)
    before = _model.texts_embedded
    vectors = _embedder.embed_documents(texts)
    return {
        "pid": os.getpid(),
        "embedded": _model.texts_embedded - before,
        "digest": vectors_digest(vectors),
    }


# --- parent side ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What one run of the indexing job cost."""

    seconds: float
    shard_pass_embedded: int
    full_pass_embedded: int
    embedded: int
    workers_seen: int
    identical_vectors: bool


def make_corpus(n: int) -> list[str]:
    """``n`` distinct, deterministic text chunks."""
    topics = ["shared memory", "pre-fork servers", "eviction", "event loops", "mmap", "RAG"]
    return [
        f"Chunk {i}: {topics[i % len(topics)]} explained, part {i // len(topics) + 1}."
        for i in range(n)
    ]


def run_job(
    corpus: list[str], workers: int, delay_s: float, shared: SharedMemoryByteStore | None
) -> JobResult:
    """Run the shard pass, then the full pass, on a fresh pool; count texts embedded."""
    everyone = multiprocessing.Barrier(workers)
    expected = vectors_digest([hash_vector(t) for t in corpus])
    pool = multiprocessing.Pool(workers, _init_worker, (shared, delay_s, everyone))
    try:
        started = time.monotonic()
        # 1. Shard pass: each text is in exactly one shard.
        shards = [corpus[i::workers] for i in range(workers)]
        shard_pass = pool.starmap(_embed, [(shard, False) for shard in shards], chunksize=1)
        # 2. Full pass: one task per worker (each waits for the others to hold one).
        tasks = [pool.apply_async(_embed, (corpus, True)) for _ in range(workers)]
        full_pass = [task.get(WAIT_TIMEOUT_S + 60) for task in tasks]
        seconds = time.monotonic() - started
    except BaseException:
        pool.terminate()
        raise
    # close+join, not terminate: the workers exit normally and detach.
    pool.close()
    pool.join()
    shard_cost = sum(r["embedded"] for r in shard_pass)
    full_cost = sum(r["embedded"] for r in full_pass)
    return JobResult(
        seconds=seconds,
        shard_pass_embedded=shard_cost,
        full_pass_embedded=full_cost,
        embedded=shard_cost + full_cost,
        workers_seen=len({r["pid"] for r in full_pass}),
        identical_vectors=all(r["digest"] == expected for r in full_pass),
    )


def _format_summary(summary: dict[str, Any]) -> Iterable[str]:
    plain, shared = summary["in_memory"], summary["shared"]
    yield ""
    yield (
        f"corpus          {summary['texts']} distinct texts, {summary['workers']} workers, "
        f"{summary['delay_s'] * 1000:.0f} ms per text embedded"
    )
    yield (
        f"per-process     {plain['embedded']:>5} texts embedded  {plain['seconds']:6.2f} s"
        f"   (InMemoryByteStore: shard pass {plain['shard_pass_embedded']},"
        f" full pass {plain['full_pass_embedded']})"
    )
    yield (
        f"shmcache        {shared['embedded']:>5} texts embedded  {shared['seconds']:6.2f} s"
        f"   (SharedMemoryByteStore: shard pass {shared['shard_pass_embedded']},"
        f" full pass {shared['full_pass_embedded']})"
    )
    if shared["embedded"] == summary["texts"]:
        how = "each text embedded once across the pool"
    elif shared["embedded"] == 0:
        how = "every vector was already in the store (a kept segment)"
    else:
        how = f"{shared['embedded']} texts embedded for {summary['texts']} distinct"
    yield (
        f"saved           {summary['saved']:>5} embeddings: {how}, "
        f"{summary['speedup']:.1f}x faster"
    )
    run = summary["this_run"]
    yield (
        f"this run        {run['misses']} misses (the shard pass), {run['hits']} hits "
        f"(the full pass: every worker read every vector), {run['updates']} values stored"
    )
    same = "yes" if summary["identical_vectors"] else "NO"
    yield f"vectors         identical in every worker, both runs: {same}"
    yield "store.stats()   " + ", ".join(f"{k}={v}" for k, v in summary["stats"].items())
    kept = "kept" if summary["kept"] else "removed; pass --keep to keep it"
    yield f"segment         {summary['segment']} ({kept})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="Embed a corpus over a process pool, with a per-process store, then "
        "with one SharedMemoryByteStore.",
    )
    p.add_argument("--workers", type=int, default=4, help="pool processes (default 4)")
    p.add_argument("--texts", type=int, default=48, help="distinct texts (default 48)")
    p.add_argument("--delay", type=float, default=0.01,
                   help="seconds per text embedded (default 0.01)")
    p.add_argument("--name", default="embeddings-demo", help="store name (default embeddings-demo)")
    p.add_argument("--directory", default=None, help="segment directory (default shmcache's)")
    p.add_argument("--keep", action="store_true", help="keep the segment at the end")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.texts < 1:
        p.error("--texts must be at least 1")
    if args.delay < 0:
        p.error("--delay must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job with per-process stores, then with the shared store; print a summary."""
    args = parse_args(argv)
    corpus = make_corpus(args.texts)
    plain = run_job(corpus, args.workers, args.delay, shared=None)
    store = SharedMemoryByteStore(args.name, directory=args.directory, size_bytes=8 << 20)
    try:
        before = store.stats()
        shared = run_job(corpus, args.workers, args.delay, shared=store)
        # The pool's workers closed their handles, so their counts are in.
        after = dataclasses.asdict(store.stats())
        delta = {k: after[k] - getattr(before, k) for k in ("hits", "misses", "updates")}
        summary: dict[str, Any] = {
            "texts": args.texts,
            "workers": args.workers,
            "delay_s": args.delay,
            "in_memory": dataclasses.asdict(plain),
            "shared": dataclasses.asdict(shared),
            "saved": plain.embedded - shared.embedded,
            "speedup": plain.seconds / max(shared.seconds, 1e-9),
            "identical_vectors": plain.identical_vectors and shared.identical_vectors,
            "this_run": delta,
            "stats": after,
            "segment": store.path,
            "kept": args.keep,
        }
    finally:
        if not args.keep:
            store.unlink()
        store.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(_format_summary(summary)))
    return 0 if summary["identical_vectors"] else 1


if __name__ == "__main__":
    sys.exit(main())
