"""Hostile neighbours: files and directories planted by someone else, names that try
to escape, other releases' segments, and forged lengths or positions."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from _hardening_helpers import HEAD_WORD_BYTE, bucket_index, cli, peek, poke, word
from langchain_core.outputs import Generation

import shmcache._arena as arena_mod
import shmcache._segment
from shmcache import SegmentPermissionError, SharedMemoryCache, ShmCacheError
from shmcache._arena import FORMAT_VERSION

LLM = "llm"
MIB = 1 << 20
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _assert_refused_as_permission(exc: BaseException) -> None:
    assert isinstance(exc, ShmCacheError) and isinstance(exc, PermissionError)
    assert isinstance(exc, SegmentPermissionError)


def _make_segment(directory: Path, name: str = "victim") -> str:
    with SharedMemoryCache(name, directory=directory, size_bytes=MIB) as cache:
        cache.update("p", LLM, [Generation(text="v")])
        return cache.path


# -- planted segment files -----------------------------------------------------------


def test_symlinked_segment_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """A segment name that is a symlink (to a valid segment elsewhere) is refused."""
    target = _make_segment(tmp_path / "elsewhere", "victim")
    directory = tmp_path / "segments"
    directory.mkdir(mode=0o700)
    os.symlink(target, directory / f"victim.v{FORMAT_VERSION}.shm")
    before = Path(target).read_bytes()
    with pytest.raises(ShmCacheError) as refused:
        SharedMemoryCache("victim", directory=directory, size_bytes=MIB)
    _assert_refused_as_permission(refused.value)
    assert "symbolic link" in str(refused.value)
    assert Path(target).read_bytes() == before


@needs_root
def test_segment_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = _make_segment(tmp_path)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ShmCacheError) as refused:
        SharedMemoryCache("victim", directory=tmp_path, size_bytes=MIB)
    _assert_refused_as_permission(refused.value)
    assert str(NOBODY) in str(refused.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666])
def test_segment_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _make_segment(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(ShmCacheError) as refused:
        SharedMemoryCache("victim", directory=tmp_path, size_bytes=MIB)
    _assert_refused_as_permission(refused.value)
    assert f"{mode:04o}" in str(refused.value)
    assert os.stat(path).st_mode & 0o777 == mode  # refused, not "fixed" behind our back


# -- the default directory -----------------------------------------------------------


def _default_dir(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setattr(shmcache._segment, "default_directory", lambda: str(path))


@pytest.mark.parametrize("problem", ["mode-0755", "mode-0711", "owned-by-nobody", "symlink"])
def test_non_private_default_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    """The default directory lives on shared ground: it must be ours and 0700."""
    if problem == "owned-by-nobody" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    directory = tmp_path / "shmcache-default"
    if problem == "symlink":
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        os.symlink(private, directory)
    else:
        directory.mkdir(mode=0o700)
        if problem.startswith("mode-"):
            os.chmod(directory, int(problem[5:], 8))
        else:
            os.chown(directory, NOBODY, NOBODY)
    _default_dir(monkeypatch, directory)
    with pytest.raises(ShmCacheError) as refused:
        SharedMemoryCache("app", size_bytes=MIB)
    _assert_refused_as_permission(refused.value)
    assert "directory=" in str(refused.value)
    assert not list(directory.iterdir())  # nothing was created in it


def test_private_default_directory_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control case: a missing default directory is created 0700 and used."""
    directory = tmp_path / "shmcache-default"
    _default_dir(monkeypatch, directory)
    with SharedMemoryCache("app", size_bytes=MIB) as cache:
        assert Path(cache.path).parent == directory
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(cache.path).st_mode & 0o777 == 0o600
        cache.unlink()


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../escape", "a/b", "/tmp/abs", "..", ".", ".hidden", "x\0y", "a" * 65, "", "é",
     "a b", "name\n", "..\\x", "~root"],
)
def test_names_cannot_escape_the_directory(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "a" / "segments"
    with pytest.raises(ValueError, match="invalid cache name"):
        SharedMemoryCache(name, directory=directory, size_bytes=MIB)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()]
    assert leftovers == []


@pytest.mark.parametrize("name", [b"bytes", None, 7, Path("p")])
def test_non_str_names_are_type_errors(tmp_path: Path, name: object) -> None:
    with pytest.raises(TypeError):
        SharedMemoryCache(name, directory=tmp_path, size_bytes=MIB)  # type: ignore[arg-type]


# -- other releases' segments ---------------------------------------------------------------


def test_segments_of_other_format_versions_stay_byte_identical(tmp_path: Path) -> None:
    """`NAME.v1.shm` and `NAME.v9.shm` (other releases, arbitrary content) are never
    read, written, removed or renamed while this release's cache is used and removed."""
    directory = tmp_path / "segments"
    directory.mkdir(mode=0o700)
    others = {
        directory / "app.v1.shm": b"SHMCACHE" + os.urandom(MIB),
        directory / "app.v9.shm": os.urandom(5000),
    }
    for path, content in others.items():
        path.write_bytes(content)
        os.chmod(path, 0o600)
    stats = {path: os.stat(path) for path in others}
    cache = SharedMemoryCache("app", directory=directory, size_bytes=MIB)
    try:
        for i in range(300):
            cache.update(f"p{i}", LLM, [Generation(text="w" * 5000)])
            cache.lookup(f"p{i // 2}", LLM)
        cache.clear(llm_string=LLM)
        cache.clear()
        assert cache.check() == []
        for args in (("check", "app"), ("clear", "app"), ("stats", "app"), ("ls",)):
            assert cli(*args, "--directory", str(directory)).returncode == 0
    finally:
        cache.close()
    assert cli("rm", "app", "--directory", str(directory)).returncode == 0
    assert not Path(cache.path).exists()
    for path, content in others.items():
        assert path.read_bytes() == content
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
            stats[path].st_ino, stats[path].st_mtime_ns, stats[path].st_mode
        )


# -- forged lengths and positions -------------------------------------------------------------


def _slot_of(cache: SharedMemoryCache, prompt: str) -> tuple[int, int]:
    """File offsets of the (position, length) fields of ``prompt``'s index slot."""
    g = cache._arena.geometry
    bucket = g.index_offset + bucket_index(prompt, LLM, g.n_buckets) * arena_mod.BUCKET_BYTES
    for slot in range(arena_mod.SLOTS_PER_BUCKET):
        at = bucket + 8 + 8 * slot
        if int.from_bytes(peek(cache.path, at, 8), "little"):
            return bucket + 72 + 8 * slot, bucket + arena_mod._LENS_AT_BYTE + 4 * slot
    raise AssertionError(f"no slot for {prompt}")


def _record_at(cache: SharedMemoryCache, prompt: str) -> int:
    """File offset of ``prompt``'s record."""
    position_at, _ = _slot_of(cache, prompt)
    position = int.from_bytes(peek(cache.path, position_at, 8), "little")
    region = cache._arena._region_of(position)  # the small or the main log
    return region.base + region.offset(position)


def _forge_record(cache: SharedMemoryCache, start: int, value: bytes) -> None:
    """Replace a record's value with ``value`` and make its crc match again."""
    header = bytearray(peek(cache.path, start, arena_mod.RECORD_HEADER_BYTES))
    fields = list(arena_mod._RECORD.unpack_from(header))
    assert arena_mod.RECORD_HEADER_BYTES + len(value) <= fields[3]
    fields[4] = len(value)
    fields[1] = 0
    packed = arena_mod._RECORD.pack(*fields)
    crc = zlib.crc32(value, zlib.crc32(packed[8:]))
    poke(cache.path, start, packed[:4] + struct.pack("<I", crc) + packed[8:] + value)


FORGERIES = {
    "slot length 2**32-1": lambda c, p: poke(c.path, _slot_of(c, p)[1], b"\xff" * 4),
    "slot position 2**62": lambda c, p: poke(
        c.path, _slot_of(c, p)[0], (1 << 62).to_bytes(8, "little")
    ),
    "slot position 2**64-1": lambda c, p: poke(c.path, _slot_of(c, p)[0], b"\xff" * 8),
    "slot position head-8": lambda c, p: poke(
        c.path, _slot_of(c, p)[0], (word(c.path, HEAD_WORD_BYTE) - 8).to_bytes(8, "little")
    ),
    "record length 2**32-1": lambda c, p: poke(c.path, _record_at(c, p) + 16, b"\xff" * 4),
    "record value length 2**32-1": lambda c, p: poke(
        c.path, _record_at(c, p) + 20, b"\xff" * 4
    ),
    "record position 2**64-1": lambda c, p: poke(c.path, _record_at(c, p) + 8, b"\xff" * 8),
}
# Values with a valid crc but hostile msgpack inside (after the codec's 5-byte prefix).
HOSTILE_VALUES = {
    "array32 of 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map32 of 2**32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "str32 of 4 GiB": b"\xdb\xff\xff\xff\xff",
    "bin32 of 4 GiB": b"\xc6\xff\xff\xff\xff",
    "2000 nested arrays": b"\x91" * 2000,
    "ext type": b"\xd4\x01\x00",
}


@pytest.mark.parametrize("forgery", list(FORGERIES) + [f"crc-valid {k}" for k in HOSTILE_VALUES])
def test_forged_lengths_and_positions_are_a_quick_miss(tmp_path: Path, forgery: str) -> None:
    """A lookup through a forged slot or record returns None at once, allocating
    nothing big; the other entries still read back, and check() names the forgery."""
    cache = SharedMemoryCache("forged", directory=tmp_path, size_bytes=MIB)
    try:
        for i in range(20):
            cache.update(f"p{i}", LLM, [Generation(text=f"value {i} " + "q" * 2000)])
        if forgery.startswith("crc-valid "):
            start = _record_at(cache, "p7")
            prefix = peek(cache.path, start + arena_mod.RECORD_HEADER_BYTES, 5)
            _forge_record(cache, start, prefix + HOSTILE_VALUES[forgery[10:]])
        else:
            FORGERIES[forgery](cache, "p7")
        tracemalloc.start()
        started = time.monotonic()
        try:
            got = cache.lookup("p7", LLM)
            took = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got is None
        assert took < 1.0  # a liveness bound: no walk over GiBs
        assert peak < 4 * MIB, f"peak allocation {peak} bytes"
        for i in range(20):
            if i != 7:
                assert cache.lookup(f"p{i}", LLM) == [Generation(text=f"value {i} " + "q" * 2000)]
        if not forgery.startswith("crc-valid "):
            assert cache.check() != []
    finally:
        cache.close()
        cache.unlink()
