"""The ``shmcache`` command: list, inspect, clear, remove and check segments.

The CLI only attaches to existing segments (it never creates one) and its reads
count in no statistics.  Every command but ``ls`` acts on one segment kind,
``--kind`` (default ``llm``: a ``SharedMemoryCache``; ``bytes``: a
``SharedMemoryByteStore``; ``nodes``: a LangGraph node cache); ``ls`` lists them all.

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
from collections.abc import Sequence
from typing import Final, Protocol

from . import __version__
from ._arena import FORMAT_VERSION
from ._engine import Engine
from ._errors import (
    InvalidArgumentError,
    LockTimeoutError,
    SegmentCorruptError,
    SegmentNotFoundError,
    SegmentPermissionError,
    ShmCacheError,
)
from ._metrics import read_stats, render
from ._segment import (
    SEGMENT_KINDS,
    check_name,
    parse_segment_filename,
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

# The kinds in the order they are listed: the LLM cache first.
_KINDS: Final = tuple(sorted(SEGMENT_KINDS, key=lambda kind: (kind != "llm", kind)))
DEFAULT_KIND: Final = "llm"
# Files the package keeps beside a segment SEG: .SEG.lock (creation), .SEG.owners.
_COMPANION_RE: Final = re.compile(r"\.(?P<segment>.+)\.(?:lock|owners)")
_COMPANION_SUFFIXES: Final = (".lock", ".owners")
# A segment being created aside: .SEG.tmp-PID.RANDOM
_TEMP_RE: Final = re.compile(r"\.(?P<segment>.+)\.tmp-(?P<pid>\d+)(?:\..*)?")


def _where(directory: str | None, kind: str = DEFAULT_KIND) -> str:
    """The options that name a segment's kind and directory, for advice printed."""
    kind_part = "" if kind == DEFAULT_KIND else f" --kind {kind}"
    return kind_part + (f" --directory {directory}" if directory else "")


def _segment_file(name: str, directory: str | None, kind: str = DEFAULT_KIND) -> str:
    check_name(name)
    return segment_path(resolve_directory(directory, create=False), name, FORMAT_VERSION, kind)


def _no_such_cache(name: str, path: str, kind: str = DEFAULT_KIND) -> SegmentNotFoundError:
    of_kind = "" if kind == DEFAULT_KIND else f" of kind {kind}"
    return SegmentNotFoundError(
        errno.ENOENT,
        f"no cache named {name!r}{of_kind} at {path} (`shmcache ls` lists the caches)",
    )


# -- read-only access (ls, stats): no lock, no owner slot, no writes ---------------


def _read_stats(name: str, path: str, directory: str | None, kind: str) -> CacheStats:
    """The counters of the segment at ``path``, mapped read-only (see
    :func:`shmcache._metrics.read_stats`): summed as ``stats()`` sums them, less an
    instance's own pending counts (the CLI has none)."""
    try:
        return read_stats(path, f"remove it with `shmcache rm {name}{_where(directory, kind)}`")
    except FileNotFoundError:
        raise _no_such_cache(name, path, kind) from None


# -- locked access (check, clear) ----------------------------------------------------


class _Attached(Protocol):
    """What check and clear need of an attached segment, whatever its kind."""

    @property
    def path(self) -> str: ...

    def lock_holder(self) -> int | None: ...

    def check(self) -> list[str]: ...

    def clear(self) -> None: ...

    def stats(self) -> CacheStats: ...

    def close(self) -> None: ...


def _attach(
    name: str, directory: str | None, lock_timeout: float, kind: str = DEFAULT_KIND
) -> _Attached:
    """Open an existing segment of ``kind`` for check and clear, without creating one.

    An LLM cache is opened as a :class:`SharedMemoryCache`; the other kinds through
    the engine every front-end shares (the same arena, lock and repair), with no
    front-end of their own: the CLI needs none to verify or empty a segment.
    """
    path = _segment_file(name, directory, kind)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        raise _no_such_cache(name, path, kind) from None
    if kind == DEFAULT_KIND:
        return SharedMemoryCache(
            name, size_bytes=max(size, MIN_SIZE_BYTES), directory=directory,
            lock_timeout=lock_timeout,
        )
    return Engine(
        name, kind=kind, owner="shmcache CLI", size_bytes=max(size, MIN_SIZE_BYTES),
        directory=directory, lock_timeout=lock_timeout,
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


def _lock_holder(cache: _Attached) -> int | None:
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


def _busy(action: str, name: str, cache: _Attached, lock_timeout: float) -> int:
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


def _classify(entry: str, directory: str) -> tuple[str, int, str] | str | None:
    """Sort one directory entry out.

    Returns:
        ``(name, version, kind)`` for a segment of a valid cache name, None for a
        file the package keeps beside a segment (not worth a mention), else a note
        saying what the entry is.
    """
    companion = _COMPANION_RE.fullmatch(entry)
    if companion and parse_segment_filename(companion["segment"]):
        return None
    temp = _TEMP_RE.fullmatch(entry)
    if temp and parse_segment_filename(temp["segment"]):
        return _temp_note(int(temp["pid"]))
    parsed = parse_segment_filename(entry)
    if parsed:
        if _valid_name(parsed[0]):
            return parsed
        return (
            "not a valid cache name (1-64 characters of [A-Za-z0-9._-], not starting "
            "with '.'), so no cache uses it; rename or remove it"
        )
    if os.path.isdir(os.path.join(directory, entry)):
        return "a directory, not a shmcache file"
    return "not a shmcache file"


def _cache_row(
    name: str, version: int, kind: str, args: argparse.Namespace, directory: str
) -> list[str]:
    first = [name, kind, f"v{version}"]
    if version != FORMAT_VERSION:
        note = f"other shmcache release (format {version}; this one uses {FORMAT_VERSION})"
        return [*first, "-", "-", "-", note]
    path = segment_path(directory, name, version, kind)
    try:
        s = _read_stats(name, path, args.directory, kind)
    except SegmentCorruptError as exc:
        return [*first, "-", "-", "-", f"DAMAGED: {_message(exc)}"]
    except (OSError, ShmCacheError) as exc:
        return [*first, "-", "-", "-", f"cannot read: {_message(exc)}"]
    return [*first, _human(s.size_bytes), str(s.entries), _human(s.used_bytes),
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
    segments: list[tuple[str, int, str]] = []
    notes: list[tuple[str, str]] = []
    for entry in entries:
        found = _classify(entry, directory)
        if found is None:
            continue
        if isinstance(found, str):
            notes.append((_shown(entry), found))
        else:
            segments.append(found)
    # By name, then kind (the LLM cache first), then format version.
    segments.sort(key=lambda seg: (seg[0], _KINDS.index(seg[2]), seg[1]))
    rows = [_cache_row(name, version, kind, args, directory) for name, version, kind in segments]
    if rows:
        header = ["NAME", "KIND", "FORMAT", "SIZE", "ENTRIES", "USED", "NOTE"]
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
    path = _segment_file(args.name, args.directory, args.kind)
    stats = _read_stats(args.name, path, args.directory, args.kind)
    if args.prometheus:
        sys.stdout.write(render([(args.name, args.kind, stats)]))
    elif args.json:
        print(json.dumps({"name": args.name, "kind": args.kind, "path": path,
                          **stats.as_dict()}))
    else:
        shown_kind = "" if args.kind == DEFAULT_KIND else f" [{args.kind}]"
        print(f"{args.name}{shown_kind} ({path})")
        for key, value in stats.as_dict().items():
            print(f"  {key:<11} {value}")
    return EXIT_OK


def _clear(cache: _Attached, llm_string: str | None) -> None:
    if llm_string is None:
        cache.clear()
    elif isinstance(cache, SharedMemoryCache):
        cache.clear(llm_string=llm_string)
    else:  # pragma: no cover - _cmd_clear refuses --llm-string for other kinds
        raise InvalidArgumentError("--llm-string applies to LLM caches only")


def _cmd_clear(args: argparse.Namespace) -> int:
    if args.llm_string is not None and args.kind != DEFAULT_KIND:
        raise InvalidArgumentError(
            f"--llm-string applies to LLM caches only (--kind {DEFAULT_KIND}), not to "
            f"--kind {args.kind}; leave it out to empty the whole segment"
        )
    with contextlib.closing(
        _attach(args.name, args.directory, args.lock_timeout, args.kind)
    ) as cache:
        try:
            _clear(cache, args.llm_string)
        except LockTimeoutError:
            return _busy("clear", args.name, cache, args.lock_timeout)
    if args.llm_string is None:
        print(f"cleared {args.name}")
    else:
        print(f"cleared the entries of {args.name} stored under that llm_string")
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    path = _segment_file(args.name, args.directory, args.kind)
    if not os.path.lexists(path):
        of_kind = "" if args.kind == DEFAULT_KIND else f" of kind {args.kind}"
        print(f"shmcache: no cache named {args.name!r}{of_kind} at {path}", file=sys.stderr)
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
        cache = _attach(args.name, args.directory, args.lock_timeout, args.kind)
    except SegmentCorruptError as exc:
        print(f"DAMAGED: {exc}")
        return EXIT_DAMAGED
    with contextlib.closing(cache):
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
        where = _where(args.directory, args.kind)
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
                "--kind", choices=_KINDS, default=DEFAULT_KIND,
                help="which front-end's segment: llm (SharedMemoryCache), bytes "
                "(SharedMemoryByteStore), nodes (LangGraph node cache); default: llm",
            )
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

    command("ls", "list the caches of every kind in the directory (takes no lock)",
            named=False).set_defaults(func=_cmd_ls)
    stats = command("stats", "print a cache's counters (takes no lock)")
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument(
        "--prometheus", action="store_true",
        help="print the counters in Prometheus text exposition format (the host's totals)",
    )
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
