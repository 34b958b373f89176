"""shmcache: a LangChain LLM cache shared by every process on the host."""

from __future__ import annotations
