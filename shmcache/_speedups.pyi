"""Types of the optional C extension (shmcache/_speedups.c)."""

import mmap
from collections.abc import Callable, Mapping

RECORD_HEADER_BYTES: int
BUCKET_WORDS: int

class Finder:
    """``Arena.find`` in C over one mapped segment."""

    def __init__(
        self,
        mapping: mmap.mmap,
        n_buckets: int,
        index_word: int,
        main: tuple[int, int, int, int],
        small: tuple[int, int, int, int],
        contended: object,
    ) -> None: ...
    def find(self, digest: bytes, now: float) -> memoryview | object | None: ...
    def set_leases(
        self, lock_pid_word: int, first_word: int, entries: int, window: int
    ) -> None: ...
    def claim(
        self,
        fd: int,
        digest: bytes,
        now: float,
        owner: int,
        deadline_ns: int,
        caller: int,
        pid: int,
    ) -> memoryview | int | None: ...
    def release(self) -> None: ...

def crc32(data: bytes, start: int = 0) -> int: ...
def plain_tree(value: object, depth: int, max_depth: int, text_type: type) -> bool: ...
def rebuild(
    payload: object, generation_table: tuple[object, ...], message_table: tuple[object, ...]
) -> list[object] | None: ...
def decode_plain(
    data: object,
    header: bytes,
    unpackb: Callable[..., object],
    ext_hook: Callable[..., object],
    generation_table: tuple[object, ...],
    message_table: tuple[object, ...],
) -> list[object] | None: ...
def flatten(
    generations: object,
    generation_encoders: Mapping[type, object],
    message_encoders: Mapping[type, object],
    text_type: type,
    max_depth: int,
) -> list[object] | None: ...
