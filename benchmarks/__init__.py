"""Benchmark harness: shmcache side by side with other LangChain caches and stores.

Run ``python -m benchmarks`` from the repository root; see ``benchmarks/README.md``.
"""

from __future__ import annotations
