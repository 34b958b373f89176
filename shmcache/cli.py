"""The ``shmcache`` command: list, inspect, clear, remove and check segments.

The CLI only attaches to existing segments (it never creates one) and its reads
count in no statistics.

``ls`` and ``stats`` map the segment read-only and take no lock: they answer at
once even while a writer holds the lock (or is stopped holding it), and they cannot
change the segment or claim an owner slot.  ``check`` and ``clear`` need the writer
lock; each waits for it at most ``--lock-timeout`` seconds and, when it is not had,
says which process holds it and what to do about it.

Exit status: 0 ok; 1 damaged (``check``) or the command failed; 2 bad usage or no
such cache; 3 the lock was not had within ``--lock-timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Final

from . import __version__, _arena
from ._arena import FORMAT_VERSION, Arena
from ._errors import (
    InvalidArgumentError,
    LockTimeoutError,
    SegmentCorruptError,
    SegmentNotFoundError,
    SegmentPermissionError,
    ShmCacheError,
)
from ._segment import (
    SEGMENT_SUFFIX,
    check_name,
    open_read_only,
    resolve_directory,
    segment_path,
)
from ._stats import CacheStats
from .cache import MIN_SIZE_BYTES, SharedMemoryCache

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_DAMAGED: Final = 1
EXIT_USAGE: Final = 2
EXIT_BUSY: Final = 3
# check and clear wait at most this long for a busy writer (--lock-timeout).
DEFAULT_LOCK_TIMEOUT_S: Final = 3.0
_MAX_LOCK_TIMEOUT_S: Final = 3600.0

_SUFFIX: Final = re.escape(SEGMENT_SUFFIX)
_SEGMENT_RE: Final = re.compile(rf"(?P<name>.+)\.v(?P<version>\d+){_SUFFIX}")
# Files the package keeps beside a segment: the creation lock, the owner-slot file.
_COMPANION_RE: Final = re.compile(rf"\..+\.v\d+{_SUFFIX}\.(?:lock|owners)")
_COMPANION_SUFFIXES: Final = (".lock", ".owners")
# A segment being created aside: .NAME.vN.shm.tmp-PID.RANDOM
_TEMP_RE: Final = re.compile(rf"\.(?P<segment>.+\.v\d+{_SUFFIX})\.tmp-(?P<pid>\d+)(?:\..*)?")


def _where(directory: str | None) -> str:
    return f" --directory {directory}" if directory else ""


def _segment_file(name: str, directory: str | None) -> str:
    check_name(name)
    return segment_path(resolve_directory(directory, create=False), name, FORMAT_VERSION)


def _no_such_cache(name: str, path: str) -> SegmentNotFoundError:
    return SegmentNotFoundError(
        errno.ENOENT, f"no cache named {name!r} at {path} (`shmcache ls` lists the caches)"
    )


# -- read-only access (ls, stats): no lock, no owner slot, no writes ---------------


@contextlib.contextmanager
def _read_only(name: str, path: str, directory: str | None) -> Iterator[Arena]:
    """Map the segment at ``path`` read-only and yield its arena."""
    try:
        mapped = open_read_only(path, _arena.HEADER_BYTES)
    except FileNotFoundError:
        raise _no_such_cache(name, path) from None
    try:
        hint = f"remove it with `shmcache rm {name}{_where(directory)}`"
        arena = Arena(mapped.mapping, _arena.read_geometry(mapped.mapping, path, hint))
        try:
            yield arena
        finally:
            arena.release()
    finally:
        mapped.close()


# What Arena.process_totals() sums, in its order (the owner-slot counters).


def _read_stats(arena: Arena) -> CacheStats:
    """The segment's counters, summed as :meth:`SharedMemoryCache.stats` sums them
    (less that instance's own pending counts: the CLI has none)."""
    return CacheStats(**arena.counts())


# -- locked access (check, clear) ----------------------------------------------------


def _attach(name: str, directory: str | None, lock_timeout: float) -> SharedMemoryCache:
    """Open an existing segment as a cache, without creating one."""
    path = _segment_file(name, directory)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        raise _no_such_cache(name, path) from None
    return SharedMemoryCache(
        name, size_bytes=max(size, MIN_SIZE_BYTES), directory=directory,
        lock_timeout=lock_timeout,
    )


def _flock_holder(path: str) -> int | None:
    """The pid holding a ``flock`` on ``path``, from ``/proc/locks`` (Linux), or None."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1b:65 0 EOF"; waiters are marked "->".
        fields = line.split()
        if (
            len(fields) >= 6
            and fields[1:4:2] == ["FLOCK", "WRITE"]
            and fields[5] == device
            and fields[4].isdigit()
            and int(fields[4]) > 0
        ):
            return int(fields[4])
    return None


def _lock_holder(cache: SharedMemoryCache) -> int | None:
    """The pid that holds the cache's writer lock, if it can be known."""
    getter = getattr(cache, "lock_holder", None)  # recorded in the segment header
    if callable(getter):
        with contextlib.suppress(OSError, ShmCacheError, ValueError):
            pid = getter()
            if isinstance(pid, int) and pid > 0:
                return pid
    return _flock_holder(cache.path)


def _process_state(pid: int) -> tuple[str, str] | None:
    """``(state letter, command line)`` of a visible process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_line = handle.read().decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ("?", "")  # alive, but no /proc (macOS)
    # "pid (comm) S ...": comm may hold spaces and parentheses.
    state = stat_line[stat_line.rfind(")") + 2 :][:1] or "?"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return state, command


def _holder_advice(pid: int | None, path: str, lock_timeout: float) -> str:
    """What to tell the user about the process that keeps the lock."""
    if pid is None:
        return (
            "The holder is not known: `fuser -v " + path + "` lists the processes that "
            "have the cache open. If one is stopped (state T in `ps -o pid,stat,args -p "
            "PID`), resume it with `kill -CONT PID`; otherwise wait and retry, or pass a "
            f"longer --lock-timeout (now {lock_timeout:g}s)."
        )
    found = _process_state(pid)
    if found is None:
        return (
            f"The segment names pid {pid} as the holder, but no such process is visible "
            "here: it may run in another container (pid namespace) sharing this "
            "directory. Resume or end it there, then retry."
        )
    state, command = found
    who = f"pid {pid}" + (f" ({command[:80]})" if command else "")
    if state in ("T", "t"):
        return (
            f"It is held by {who}, which is stopped: resume it with `kill -CONT {pid}`, "
            f"or end it with `kill {pid}` (the kernel frees the lock when it exits); "
            "then retry."
        )
    return (
        f"It is held by {who}: wait for it and retry, or pass a longer --lock-timeout "
        f"(now {lock_timeout:g}s). If it never lets go, end it with `kill {pid}` (the "
        "kernel frees the lock when it exits)."
    )


def _busy(action: str, name: str, cache: SharedMemoryCache, lock_timeout: float) -> int:
    holder = _lock_holder(cache)
    print(
        f"shmcache: could not {action} {name!r}: its lock was not free within "
        f"--lock-timeout={lock_timeout:g}s.\n  "
        + _holder_advice(holder, cache.path, lock_timeout),
        file=sys.stderr,
    )
    return EXIT_BUSY


# -- commands ----------------------------------------------------------------------


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _shown(entry: str) -> str:
    """A directory entry as it can be printed (odd bytes and controls escaped)."""
    return entry if entry.isprintable() else ascii(entry)


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidArgumentError:
        return False
    return True


def _temp_note(pid: int) -> str:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return (
            f"temp file left by a creator that died (pid {pid}); the next open of that "
            "cache removes it"
        )
    except PermissionError:
        pass
    return f"temp file of a segment being created by pid {pid}"


def _classify(entry: str, directory: str) -> tuple[str, int] | str | None:
    """Sort one directory entry out.

    Returns:
        ``(name, version)`` for a segment of a valid cache name, None for a file the
        package keeps beside a segment (not worth a mention), else a note saying what
        the entry is.
    """
    if _COMPANION_RE.fullmatch(entry):
        return None
    temp = _TEMP_RE.fullmatch(entry)
    if temp:
        return _temp_note(int(temp["pid"]))
    match = _SEGMENT_RE.fullmatch(entry)
    if match:
        if _valid_name(match["name"]):
            return match["name"], int(match["version"])
        return (
            "not a valid cache name (1-64 characters of [A-Za-z0-9._-], not starting "
            "with '.'), so no cache uses it; rename or remove it"
        )
    if os.path.isdir(os.path.join(directory, entry)):
        return "a directory, not a shmcache file"
    return "not a shmcache file"


def _cache_row(name: str, version: int, args: argparse.Namespace, directory: str) -> list[str]:
    if version != FORMAT_VERSION:
        note = f"other shmcache release (format {version}; this one uses {FORMAT_VERSION})"
        return [name, f"v{version}", "-", "-", "-", note]
    path = segment_path(directory, name, version)
    try:
        with _read_only(name, path, args.directory) as arena:
            s = _read_stats(arena)
    except SegmentCorruptError as exc:
        return [name, f"v{version}", "-", "-", "-", f"DAMAGED: {_message(exc)}"]
    except (OSError, ShmCacheError) as exc:
        return [name, f"v{version}", "-", "-", "-", f"cannot read: {_message(exc)}"]
    return [name, f"v{version}", _human(s.size_bytes), str(s.entries), _human(s.used_bytes),
            f"{s.hits} hits / {s.misses} misses"]


def _cmd_ls(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.directory, create=False)
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        entries = []
    except PermissionError as exc:
        raise SegmentPermissionError(
            exc.errno, f"cannot list {directory}: permission denied (uid {os.geteuid()})"
        ) from exc
    rows: list[list[str]] = []
    notes: list[tuple[str, str]] = []
    for entry in entries:
        kind = _classify(entry, directory)
        if kind is None:
            continue
        if isinstance(kind, str):
            notes.append((_shown(entry), kind))
        else:
            rows.append(_cache_row(kind[0], kind[1], args, directory))
    if rows:
        header = ["NAME", "FORMAT", "SIZE", "ENTRIES", "USED", "NOTE"]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
        for row in (header, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                  + "  " + row[-1])
    else:
        print(f"no caches in {directory}")
    if notes:
        print(f"\nother files in {directory} (not caches; left alone):")
        width = max(len(entry) for entry, _ in notes)
        for entry, note in notes:
            print(f"  {entry.ljust(width)}  {note}")
    return EXIT_OK


def _cmd_stats(args: argparse.Namespace) -> int:
    path = _segment_file(args.name, args.directory)
    with _read_only(args.name, path, args.directory) as arena:
        stats = _read_stats(arena)
    if args.json:
        print(json.dumps({"name": args.name, "path": path, **stats.as_dict()}))
    else:
        print(f"{args.name} ({path})")
        for key, value in stats.as_dict().items():
            print(f"  {key:<11} {value}")
    return EXIT_OK


def _cmd_clear(args: argparse.Namespace) -> int:
    with _attach(args.name, args.directory, args.lock_timeout) as cache:
        try:
            if args.llm_string is None:
                cache.clear()
            else:
                cache.clear(llm_string=args.llm_string)
        except LockTimeoutError:
            return _busy("clear", args.name, cache, args.lock_timeout)
    if args.llm_string is None:
        print(f"cleared {args.name}")
    else:
        print(f"cleared the entries of {args.name} stored under that llm_string")
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    path = _segment_file(args.name, args.directory)
    if not os.path.lexists(path):
        print(f"shmcache: no cache named {args.name!r} at {path}", file=sys.stderr)
        return EXIT_USAGE
    os.unlink(path)
    directory, base = os.path.split(path)
    for suffix in _COMPANION_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, f".{base}{suffix}"))
    print(f"removed {path} (processes still attached keep their copy until they close)")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cache = _attach(args.name, args.directory, args.lock_timeout)
    except SegmentCorruptError as exc:
        print(f"DAMAGED: {exc}")
        return EXIT_DAMAGED
    with cache:
        try:
            problems = cache.check()
        except LockTimeoutError:
            return _busy("check", args.name, cache, args.lock_timeout)
        stats = cache.stats()
    if problems:
        print(f"DAMAGED: {len(problems)} problem(s) in {cache.path}:")
        for problem in problems[:50]:
            print(f"  - {problem}")
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more")
        where = _where(args.directory)
        print(
            f"Fix: `shmcache clear {args.name}{where}` empties it; "
            f"`shmcache rm {args.name}{where}` removes it."
        )
        return EXIT_DAMAGED
    print(f"ok: {cache.path}: {stats.entries} entries, {stats.used_bytes} bytes in use")
    return EXIT_OK


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= _MAX_LOCK_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and at most {_MAX_LOCK_TIMEOUT_S:g}, "
            f"not {text!r}"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache", description="Inspect and manage shmcache shared-memory caches.",
        epilog="exit status: 0 ok, 1 damaged or failed, 2 bad usage or no such cache, "
        "3 the lock was not had within --lock-timeout",
    )
    parser.add_argument("--version", action="version", version=f"shmcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help_text: str, *, named: bool = True, locked: bool = False
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if named:
            sub.add_argument("name", metavar="NAME", help="cache name")
        sub.add_argument(
            "--directory", metavar="DIR", default=None,
            help="segment directory (default: /dev/shm/shmcache-<uid>)",
        )
        if locked:
            sub.add_argument(
                "--lock-timeout", metavar="SECONDS", type=_seconds,
                default=DEFAULT_LOCK_TIMEOUT_S,
                help="the longest wait for a process that holds the cache's lock "
                f"(default: {DEFAULT_LOCK_TIMEOUT_S:g})",
            )
        return sub

    command("ls", "list the caches in the directory (takes no lock)",
            named=False).set_defaults(func=_cmd_ls)
    stats = command("stats", "print a cache's counters (takes no lock)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_cmd_stats)
    clear = command("clear", "empty a cache for every process", locked=True)
    clear.add_argument("--llm-string", metavar="S", default=None,
                       help="remove only the entries stored under this llm_string")
    clear.set_defaults(func=_cmd_clear)
    command("rm", "remove a cache's segment file").set_defaults(func=_cmd_rm)
    command("check", "verify a cache's segment; exit 1 on damage",
            locked=True).set_defaults(func=_cmd_check)
    return parser


def _message(exc: BaseException) -> str:
    """An error's message without the ``[Errno N]`` prefix of our own OSErrors."""
    if (
        isinstance(exc, ShmCacheError)
        and isinstance(exc, OSError)
        and exc.strerror
        and exc.filename is None
    ):
        return exc.strerror
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return its exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except LockTimeoutError as exc:
        print(f"shmcache: {_message(exc)}", file=sys.stderr)
        return EXIT_BUSY
    except (InvalidArgumentError, SegmentNotFoundError, TypeError) as exc:
        print(f"shmcache: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ShmCacheError, ValueError) as exc:
        print(f"shmcache: {_message(exc)}", file=sys.stderr)
        return EXIT_DAMAGED
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
