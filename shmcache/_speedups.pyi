"""Types of the optional C extension (shmcache/_speedups.c)."""

import mmap

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
    def release(self) -> None: ...

def crc32(data: bytes, start: int = 0) -> int: ...
