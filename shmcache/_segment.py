"""Segment files: where they live, how they are created, and who may open them.

A segment is one regular file, private to its owner (0600 in a 0700 directory),
mapped shared by every process that opens it.  It is created complete and aside
(a temp file sized with ``posix_fallocate`` and initialised), then linked into
place with ``os.link``, which fails if the name exists: a process killed while
creating leaves at most a temp file, never a half-made segment under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable
from typing import Final

import filelock

from ._errors import (
    InvalidArgumentError,
    SegmentCorruptError,
    SegmentDirectoryError,
    SegmentNotFoundError,
    SegmentOpenError,
    SegmentPermissionError,
    SegmentSpaceError,
    ShmCacheError,
)

__all__ = [
    "SEGMENT_KINDS",
    "SEGMENT_SUFFIX",
    "MappedFile",
    "check_name",
    "default_directory",
    "mapped_length",
    "open_existing",
    "open_or_create",
    "open_read_only",
    "parse_segment_filename",
    "resolve_directory",
    "segment_path",
]

logger = logging.getLogger("shmcache")

SEGMENT_SUFFIX: Final = ".shm"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_OPEN_FLAGS: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a segment's name read-only would block.
_READ_ONLY_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# What each front-end's segment holds: LLM generations, a ByteStore's values, a
# LangGraph node cache's entries.
SEGMENT_KINDS: Final = frozenset({"llm", "bytes", "nodes"})
_SEGMENT_FILE_RE: Final = re.compile(
    rf"(?P<name>.+)\.v(?P<version>\d+)(?:\.(?P<kind>bytes|nodes))?{re.escape(SEGMENT_SUFFIX)}"
)
_PRIVATE_FILE_MODE: Final = 0o600
_PRIVATE_DIR_MODE: Final = 0o700


class MappedFile:
    """An open segment file and its shared mapping."""

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.mapping = mapping
        self.created = created

    def close(self) -> None:
        """Unmap and close the file."""
        try:
            self.mapping.close()
        finally:
            os.close(self.fd)


def mapped_length(size_bytes: int) -> int:
    """How much of a ``size_bytes`` file is mapped: whole 64-bit words only.

    The file keeps the exact size asked for; the last few bytes of a size that is
    not a multiple of 8 are simply not used.
    """
    return size_bytes - size_bytes % 8


def check_name(name: object) -> str:
    """Validate a cache name and return it.

    Raises:
        TypeError: ``name`` is not a ``str``.
        InvalidArgumentError: ``name`` is not 1-64 characters of ``[A-Za-z0-9._-]``
            or starts with ``.`` (also a ``ValueError``).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid cache name {name!r}: use 1-64 characters of [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return name


def default_directory() -> str:
    """Return the per-user default directory (``/dev/shm/shmcache-<uid>``)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"shmcache-{os.geteuid()}")


def resolve_directory(directory: str | os.PathLike[str] | None, *, create: bool) -> str:
    """Return the segment directory, creating it 0700 when ``create`` is true.

    The default directory is shared ground (``/dev/shm`` is world-writable), so it
    must be a real directory owned by this user and closed to everyone else.  A
    ``directory=`` the caller gave may be a symlink to a directory (their choice).
    Without ``create`` a missing directory is returned as is (it holds no caches).

    Raises:
        TypeError: ``directory`` is not a ``str`` or ``os.PathLike[str]``.
        InvalidArgumentError: ``directory`` is empty or holds a NUL character.
        SegmentPermissionError: the default directory is not private to this user,
            or the directory cannot be created for lack of permission.
        SegmentDirectoryError: the path, or one of its parents, is not a directory.
        SegmentOpenError: any other OS error (read-only file system, ...).
    """
    if directory is None:
        path = default_directory()
        must_be_private = True
        given = f"the default directory {path}"
    else:
        path = os.fspath(directory)
        if not isinstance(path, str):
            raise TypeError("directory must be a str or os.PathLike[str]")
        must_be_private = False
        given = f"directory={path!r}"
        if not path:
            raise InvalidArgumentError(
                "directory='' is an empty path; pass directory=None for the default "
                f"({default_directory()}) or the path of a directory"
            )
        if "\0" in path:
            raise InvalidArgumentError(
                f"{given} holds a NUL character; pass the path of a directory"
            )
    if create:
        try:
            os.makedirs(path, mode=_PRIVATE_DIR_MODE, exist_ok=True)
        except FileExistsError:
            pass  # something that is not a directory: reported just below
        except OSError as exc:
            raise _directory_error(exc, path, given) from exc
    if must_be_private and os.path.lexists(path):
        info = os.lstat(path)
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & 0o077
        ):
            raise SegmentPermissionError(
                f"{path} must be a directory owned by uid {os.geteuid()} with mode 0700; "
                "remove it or pass directory= to use another place"
            )
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        if not create and not os.path.lexists(path):
            return path  # nothing there yet: no caches
        raise SegmentNotFoundError(
            errno.ENOENT,
            f"{given} is a symbolic link to {os.path.realpath(path)}, which does not "
            "exist; create that directory or pass directory= another path",
        ) from exc
    except OSError as exc:
        raise _directory_error(exc, path, given) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise _not_a_directory(path, given, path)
    return path


def _kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "not a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode):
        return "a symbolic link to something that is not a directory"
    return "not a directory"


def _first_non_directory(path: str) -> str:
    """The first existing component of ``path`` that is not a directory (or ``path``)."""
    parts: list[str] = []
    head = path
    while head and head not in parts:
        parts.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for part in reversed(parts):  # from the root down
        try:
            if not stat.S_ISDIR(os.stat(part).st_mode):
                return part
        except FileNotFoundError:
            break
        except OSError:
            return part
    return path


def _nearest_existing(path: str) -> str:
    """The deepest existing ancestor of ``path`` (``path`` itself if it exists)."""
    head = os.path.abspath(path)
    while not os.path.lexists(head):
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    return head


def _not_a_directory(path: str, given: str, culprit: str) -> SegmentDirectoryError:
    where = "it" if culprit == path else repr(culprit)
    return SegmentDirectoryError(
        errno.ENOTDIR,
        f"{given} is not usable as a cache directory: {where} is {_kind(culprit)}; "
        "pass directory= the path of a directory (it is created if missing)",
    )


def _directory_error(exc: OSError, path: str, given: str) -> ShmCacheError:
    """Turn an OS error about the segment directory into one of ours."""
    code = exc.errno
    if code == errno.ENOTDIR:
        return _not_a_directory(path, given, _first_non_directory(path))
    parent = _nearest_existing(path)
    if code in (errno.EACCES, errno.EPERM):
        return SegmentPermissionError(
            code,
            f"cannot create {given}: permission denied in {parent} (uid {os.geteuid()}); "
            f"create it yourself (mkdir -m 700 {path}) or pass directory= a place "
            "this user can write",
        )
    if code == errno.EROFS:
        return SegmentOpenError(
            code,
            f"cannot create {given}: {parent} is on a read-only file system; pass "
            "directory= a writable place",
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return SegmentSpaceError(
            code,
            f"cannot create {given}: no space left in {parent}; free space there or "
            "pass directory= elsewhere",
        )
    if code == errno.ENOENT:
        return SegmentNotFoundError(
            code,
            f"cannot create {given}: {exc.strerror} (in {parent}; removed meanwhile, "
            "or a file system that holds no directories); pass directory= another path",
        )
    return SegmentOpenError(
        code or errno.EIO,
        f"cannot use {given}: {exc.strerror or exc}; pass directory= another path",
    )


def _segment_error(exc: OSError, path: str) -> ShmCacheError:
    """Turn an OS error while opening or creating the segment at ``path`` into one of ours.

    The message names the segment and its directory as the caller gave them, never
    the temp file a creation works on.
    """
    code = exc.errno
    directory = os.path.dirname(path) or "."
    name = _name_of(path)
    if code in (errno.EACCES, errno.EPERM):
        if os.path.lexists(path):
            return SegmentPermissionError(
                code,
                f"cannot open segment {path}: permission denied; it must be a file this "
                f"user (uid {os.geteuid()}) can read and write: fix its mode (chmod 600) "
                f"or remove it (shmcache rm {name} --directory {directory})",
            )
        return SegmentPermissionError(
            code,
            f"cannot create cache {name!r} in {directory}: permission denied (uid "
            f"{os.geteuid()} cannot write there); make the directory writable for this "
            "user (chmod u+w) or pass directory= a directory this user can write",
        )
    if code == errno.EROFS:
        return SegmentOpenError(
            code,
            f"cannot create cache {name!r} in {directory}: it is on a read-only file "
            "system; pass directory= a writable place",
        )
    if code == errno.ENOTDIR:
        return SegmentDirectoryError(
            code,
            f"cannot open cache {name!r}: {directory} is not a directory (any more); "
            "pass directory= the path of a directory",
        )
    if code == errno.ENOENT:
        return SegmentNotFoundError(
            code,
            f"cannot create cache {name!r}: the directory {directory} does not exist "
            "(removed meanwhile?); open the cache again to re-create it",
        )
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SegmentSpaceError(
            code,
            f"no space for cache {name!r} in {directory} ({exc.strerror}); free space "
            "there, pass a smaller size_bytes, or pass directory= elsewhere",
        )
    hint = {
        errno.ENODEV: " (its file system does not support shared memory mappings)",
        errno.ENAMETOOLONG: " (the path is too long)",
    }.get(code or 0, "")
    return SegmentOpenError(
        code or errno.EIO,
        f"cannot open or create segment {path}: {exc.strerror or exc}{hint}; pass "
        "directory= another directory (on tmpfs such as /dev/shm, or a local disk)",
    )


def segment_path(directory: str, name: str, format_version: int, kind: str = "llm") -> str:
    """Return the segment file path; the format version and kind are part of the name.

    An LLM cache ``NAME`` lives in ``NAME.vN.shm``, a byte store in
    ``NAME.vN.bytes.shm``, a LangGraph node cache in ``NAME.vN.nodes.shm``: every LLM
    cache file ends in ``.vN.shm`` and no other kind's does, so front-ends of one
    name never share a file, whatever dots the names hold.
    """
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"unknown segment kind {kind!r}; one of {sorted(SEGMENT_KINDS)}")
    middle = "" if kind == "llm" else f".{kind}"
    return os.path.join(directory, f"{name}.v{format_version}{middle}{SEGMENT_SUFFIX}")


def parse_segment_filename(filename: str) -> tuple[str, int, str] | None:
    """``(name, format version, kind)`` of a segment file name, or None."""
    match = _SEGMENT_FILE_RE.fullmatch(filename)
    if match is None:
        return None
    return match["name"], int(match["version"]), match["kind"] or "llm"


def _check_private(path: str, fd: int) -> int:
    """Refuse a segment that is not a regular 0600 file of ours; return its size."""
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}; segments must be 0600"
    if problem:
        raise SegmentPermissionError(
            f"refusing segment {path}: it {problem}. Remove it (shmcache rm) or use "
            "another name or directory"
        )
    return info.st_size


def _open_file(path: str, flags: int = _OPEN_FLAGS) -> int:
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise  # no segment there: callers decide (create it, or say so)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentPermissionError(
                f"refusing segment {path}: it is a symbolic link. Remove it or use "
                "another name or directory"
            ) from exc
        if exc.errno == errno.EISDIR:
            raise SegmentPermissionError(
                f"refusing segment {path}: it is a directory. Remove it or use another "
                "name or directory"
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            try:
                owner = os.lstat(path).st_uid
            except OSError:
                owner = os.geteuid()
            if owner != os.geteuid():
                raise SegmentPermissionError(
                    f"cannot open segment {path}: {exc.strerror}. It belongs to uid "
                    f"{owner}, not to this user (uid {os.geteuid()}): use another name "
                    "or directory"
                ) from exc
        raise _segment_error(exc, path) from exc


def _map(
    path: str, fd: int, created: bool, min_size: int, *, writable: bool = True
) -> MappedFile:
    try:
        size = _check_private(path, fd)
        if size < min_size:
            raise SegmentCorruptError(
                f"segment {path} is {size} bytes, too short to be a cache; "
                f"remove it with: shmcache rm {_name_of(path)} --directory "
                f"{os.path.dirname(path)}"
            )
        try:
            if writable:
                mapping = mmap.mmap(
                    fd, mapped_length(size), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
            else:
                mapping = mmap.mmap(fd, mapped_length(size), access=mmap.ACCESS_READ)
        except OSError as exc:
            raise _segment_error(exc, path) from exc
    except BaseException:
        os.close(fd)
        raise
    return MappedFile(path, fd, mapping, created)


def _name_of(path: str) -> str:
    """The cache name of a segment path (names may hold ".v" themselves)."""
    parsed = parse_segment_filename(os.path.basename(path))
    return os.path.basename(path) if parsed is None else parsed[0]


def open_existing(path: str, min_size: int) -> MappedFile:
    """Open and map an existing segment.

    Raises:
        FileNotFoundError: there is no segment at ``path`` (a plain one: callers
            decide what a missing segment means).
        SegmentPermissionError: the file is a symlink, not ours, or not private.
        ShmCacheError: any other OS error, as the fitting subclass (see
            :func:`open_or_create`).
    """
    return _map(path, _open_file(path), created=False, min_size=min_size)


def open_read_only(path: str, min_size: int) -> MappedFile:
    """Open and map an existing segment for reading only (what ``shmcache ls`` and
    ``stats`` use: they can change nothing in it, and need no lock).

    The same checks as :func:`open_existing` apply; the mapping is read-only, so a
    write through it raises ``TypeError`` instead of changing the segment.

    Raises:
        FileNotFoundError: there is no segment at ``path``.
        SegmentPermissionError: the file is a symlink, not ours, or not private.
        SegmentCorruptError: the file is too short to be a segment.
    """
    return _map(
        path, _open_file(path, _READ_ONLY_FLAGS), created=False, min_size=min_size,
        writable=False,
    )


def _allocate(fd: int, size: int, path: str) -> None:
    """Reserve ``size`` bytes for real, so a full tmpfs fails here, not with SIGBUS."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - macOS has no posix_fallocate
            os.ftruncate(fd, size)
            chunk = b"\0" * (1 << 20)
            for offset in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: size - offset], offset)
    except OverflowError as exc:
        raise SegmentSpaceError(
            errno.EFBIG, f"size_bytes={size} is larger than any file can be; pass a smaller one"
        ) from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            directory = os.path.dirname(path)
            raise SegmentSpaceError(
                exc.errno,
                f"no space for a {size}-byte segment in {directory} ({exc.strerror}); "
                "pass a smaller size_bytes, free space there (docker: --shm-size), "
                "or pass directory= elsewhere",
            ) from exc
        raise


def _remove_stale_temps(directory: str, name_prefix: str) -> None:
    """Delete temp files left by creators that died (their pid is gone)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(name_prefix):
            continue
        pid_text = entry[len(name_prefix) :].split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))
        except PermissionError:
            pass


def open_or_create(
    path: str,
    size_bytes: int,
    min_size: int,
    initialise: Callable[[mmap.mmap], None],
    wait_s: float,
) -> MappedFile:
    """Open the segment at ``path``, creating it with ``initialise`` if missing.

    Args:
        path: Segment file path (its directory must exist).
        size_bytes: Size of a newly created segment.
        min_size: Smallest size an existing file may have to be mapped.
        initialise: Writes the header of a new, zero-filled mapping.
        wait_s: The longest wait for another process that is creating it.

    Raises:
        ShmCacheError: the segment cannot be opened or created; the subclass also
            derives from the fitting builtin (``PermissionError``,
            ``NotADirectoryError``, ``OSError``, ...) and the message names the
            segment path (never the temp file a creation uses) and what to do.
    """
    try:
        return _open_or_create(path, size_bytes, min_size, initialise, wait_s)
    except ShmCacheError:
        raise
    except OSError as exc:
        raise _segment_error(exc, path) from exc


def _open_or_create(
    path: str,
    size_bytes: int,
    min_size: int,
    initialise: Callable[[mmap.mmap], None],
    wait_s: float,
) -> MappedFile:
    try:
        return open_existing(path, min_size)
    except FileNotFoundError:
        pass
    lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    lock = filelock.FileLock(lock_path, mode=_PRIVATE_FILE_MODE)
    try:
        lock.acquire(timeout=wait_s)
    except (filelock.Timeout, OSError) as exc:
        # The lock only spares a herd of creators from each building a segment;
        # os.link keeps creation atomic without it.  So a stopped or slow creator
        # (or a bad lock file) makes us build our own rather than wait any longer.
        logger.debug("creating %s without the creation lock: %s", path, exc)
        return _open_or_create_unlocked(path, size_bytes, min_size, initialise)
    try:
        return _open_or_create_unlocked(path, size_bytes, min_size, initialise)
    except BaseException:
        # Leave nothing behind (os.link keeps creation atomic without it).
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        raise
    finally:
        lock.release()


def _open_or_create_unlocked(
    path: str,
    size_bytes: int,
    min_size: int,
    initialise: Callable[[mmap.mmap], None],
) -> MappedFile:
    try:
        return open_existing(path, min_size)
    except FileNotFoundError:
        pass
    directory, base = os.path.split(path)
    temp_prefix = f".{base}.tmp-"
    _remove_stale_temps(directory, temp_prefix)
    # pid first (stale temps are found by it), then a random part for threads.
    temp_path = os.path.join(directory, f"{temp_prefix}{os.getpid()}.{secrets.token_hex(4)}")
    return _create(path, temp_path, size_bytes, min_size, initialise)


def _create(
    path: str,
    temp_path: str,
    size_bytes: int,
    min_size: int,
    initialise: Callable[[mmap.mmap], None],
) -> MappedFile:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp_path)
    fd = os.open(temp_path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, _PRIVATE_FILE_MODE)  # whatever the umask says
        _allocate(fd, size_bytes, path)
        with mmap.mmap(fd, mapped_length(size_bytes), mmap.MAP_SHARED) as mapping:
            initialise(mapping)
        try:
            os.link(temp_path, path)
            created = True
        except FileExistsError:
            created = False  # another creator won the race: use theirs
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            raise SegmentOpenError(
                exc.errno,
                f"cannot create segment {path}: the file system of "
                f"{os.path.dirname(path) or '.'} does not support hard links "
                f"({exc.strerror}), which shmcache needs to create segments atomically; "
                "pass directory= a directory on tmpfs (/dev/shm) or a local disk",
            ) from exc
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
    if created:
        logger.debug("created segment %s (%d bytes)", path, size_bytes)
        return _map(path, _open_file(path), created=True, min_size=min_size)
    return open_existing(path, min_size)
