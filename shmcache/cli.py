"""The ``shmcache`` command: list, inspect, clear, remove and check segments.

The CLI only attaches to existing segments (it never creates one) and its reads
count in no statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Final

from . import __version__
from ._arena import FORMAT_VERSION
from ._errors import ShmCacheError
from ._segment import SEGMENT_SUFFIX, check_name, resolve_directory, segment_path
from .cache import SharedMemoryCache

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_DAMAGED: Final = 1
EXIT_USAGE: Final = 2
_SEGMENT_RE: Final = re.compile(rf"(?P<name>[^.].*)\.v(?P<version>\d+){re.escape(SEGMENT_SUFFIX)}")
# The CLI may wait a little longer than an app would for a busy writer.
_CLI_LOCK_TIMEOUT_S: Final = 5.0


def _segment_file(name: str, directory: str | None) -> str:
    check_name(name)
    return segment_path(resolve_directory(directory, create=False), name, FORMAT_VERSION)


def _attach(name: str, directory: str | None) -> SharedMemoryCache:
    """Open an existing segment as a cache, without creating one."""
    path = _segment_file(name, directory)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"no cache named {name!r} at {path}") from None
    return SharedMemoryCache(
        name, size_bytes=max(size, 1 << 20), directory=directory,
        lock_timeout=_CLI_LOCK_TIMEOUT_S,
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _cmd_ls(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.directory, create=False)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    rows = []
    for entry in names:
        match = _SEGMENT_RE.fullmatch(entry)
        if not match:
            continue
        name, version = match["name"], int(match["version"])
        if version != FORMAT_VERSION:
            rows.append((name, f"v{version}", "-", "-", "-", "other shmcache release"))
            continue
        try:
            with _attach(name, args.directory) as cache:
                s = cache.stats()
            rows.append((name, f"v{version}", _human(s.size_bytes), str(s.entries),
                         _human(s.used_bytes), f"{s.hits} hits / {s.misses} misses"))
        except (OSError, ShmCacheError) as exc:
            rows.append((name, f"v{version}", "-", "-", "-", f"error: {exc}"))
    if not rows:
        print(f"no caches in {directory}")
        return EXIT_OK
    header = ("NAME", "FORMAT", "SIZE", "ENTRIES", "USED", "NOTE")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


def _cmd_stats(args: argparse.Namespace) -> int:
    with _attach(args.name, args.directory) as cache:
        stats = cache.stats()
        path = cache.path
    if args.json:
        print(json.dumps({"name": args.name, "path": path, **stats.as_dict()}))
    else:
        print(f"{args.name} ({path})")
        for key, value in stats.as_dict().items():
            print(f"  {key:<11} {value}")
    return EXIT_OK


def _cmd_clear(args: argparse.Namespace) -> int:
    with _attach(args.name, args.directory) as cache:
        if args.llm_string is None:
            cache.clear()
            print(f"cleared {args.name}")
        else:
            cache.clear(llm_string=args.llm_string)
            print(f"cleared the entries of {args.name} stored under that llm_string")
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    path = _segment_file(args.name, args.directory)
    if not os.path.lexists(path):
        print(f"shmcache: no cache named {args.name!r} at {path}", file=sys.stderr)
        return EXIT_USAGE
    os.unlink(path)
    lock_file = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    if os.path.lexists(lock_file):
        os.unlink(lock_file)
    print(f"removed {path} (processes still attached keep their copy until they close)")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cache = _attach(args.name, args.directory)
    except ShmCacheError as exc:
        print(f"DAMAGED: {exc}")
        return EXIT_DAMAGED
    with cache:
        problems = cache.check()
        stats = cache.stats()
    if problems:
        print(f"DAMAGED: {len(problems)} problem(s) in {cache.path}:")
        for problem in problems[:50]:
            print(f"  - {problem}")
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more")
        where = f" --directory {args.directory}" if args.directory else ""
        print(
            f"Fix: `shmcache clear {args.name}{where}` empties it; "
            f"`shmcache rm {args.name}{where}` removes it."
        )
        return EXIT_DAMAGED
    print(f"ok: {cache.path}: {stats.entries} entries, {stats.used_bytes} bytes in use")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache", description="Inspect and manage shmcache shared-memory caches."
    )
    parser.add_argument("--version", action="version", version=f"shmcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, named: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if named:
            sub.add_argument("name", metavar="NAME", help="cache name")
        sub.add_argument(
            "--directory", metavar="DIR", default=None,
            help="segment directory (default: /dev/shm/shmcache-<uid>)",
        )
        return sub

    command("ls", "list the caches in the directory", named=False).set_defaults(func=_cmd_ls)
    stats = command("stats", "print a cache's counters")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_cmd_stats)
    clear = command("clear", "empty a cache for every process")
    clear.add_argument("--llm-string", metavar="S", default=None,
                       help="remove only the entries stored under this llm_string")
    clear.set_defaults(func=_cmd_clear)
    command("rm", "remove a cache's segment file").set_defaults(func=_cmd_rm)
    command("check", "verify a cache's segment; exit 1 on damage").set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return its exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        if isinstance(exc, ShmCacheError):
            print(f"shmcache: {exc}", file=sys.stderr)
            return EXIT_DAMAGED
        print(f"shmcache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ShmCacheError) as exc:
        print(f"shmcache: {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
