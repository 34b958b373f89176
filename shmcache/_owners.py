"""Owner slots: which processes use a segment, proven alive by a kernel-held lock.

Each open cache instance claims one *owner slot* in the segment header.  The slot
holds that instance's hit/miss/skip counters (written only by it, so counting needs
no lock and is exact even if the process later dies by ``os._exit`` or SIGKILL) and
a generation number that leases use to name their owner.

Liveness never rests on pid numbers: a pid seen from another pid namespace (a
container sharing ``/dev/shm``) may be alive but invisible, or name an unrelated
process.  Instead the claimer holds a classic POSIX record lock (``F_SETLK``) on byte
``slot`` of a small companion file (``.NAME.vN.shm.owners``).  The kernel drops it
when the process dies, whatever namespace looks at it, and — unlike ``flock`` and
OFD locks — a forked child does not inherit it, even when the fork was made from C
(uWSGI), so a dead parent is never kept "alive" by its children's inherited fds.

Classic locks have one trap: closing *any* fd of the file drops every lock the
process holds on it.  So this module keeps one fd of the companion file per process,
closes it only when the process holds no slot there, and nothing else opens it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import threading
from typing import Final

from ._errors import SegmentPermissionError

__all__ = ["OwnerFile", "owners_path"]

_OPEN_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
# struct flock on Linux/x86-64 and aarch64: short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding).
_FLOCK: Final = struct.Struct("hhqqi4x")


def owners_path(segment_path: str) -> str:
    """The companion file that holds the owner-slot liveness locks of a segment."""
    directory, base = os.path.split(segment_path)
    return os.path.join(directory, f".{base}.owners")


class OwnerFile:
    """This process's handle on one segment's owner-liveness file.

    Shared by every instance of the same segment in the process (see :func:`for_path`)
    because closing any fd of the file would drop all of the process's locks on it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._fd = -1
        self.inode = -1
        self._pid = os.getpid()
        self._held: set[int] = set()

    @property
    def holds_fd(self) -> bool:
        """True while this process keeps the file open (it holds a slot there)."""
        return self._fd >= 0 and self._pid == os.getpid()

    def _fd_now(self) -> int:
        """*Guarded.* The open fd, (re)opened for this process.

        Raises:
            OSError: the file cannot be opened (e.g. no fd left).
        """
        pid = os.getpid()
        if self._pid != pid:
            # A forked child holds none of its parent's locks: start afresh (the
            # inherited fd is still a good fd of the file, keep using it).
            self._held = set()
            self._pid = pid
        if self._fd < 0:
            self._fd = _open_private(self.path)
            self.inode = os.fstat(self._fd).st_ino
        return self._fd

    def _close_if_unused(self) -> None:
        """*Guarded.* Close the fd once no slot is held (closing then drops nothing)."""
        if not self._held and self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def claim(self, n_slots: int, prefer: int = 0) -> int | None:
        """Lock a free slot for the calling instance; None when all are taken."""
        with self._guard:
            try:
                fd = self._fd_now()
            except OSError:
                return None  # no fd to spare: the caller counts in the process
            for k in range(n_slots):
                slot = (prefer + k) % n_slots
                if slot in self._held:
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot, os.SEEK_SET)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        continue
                    raise
                self._held.add(slot)
                return slot
            self._close_if_unused()
        return None

    def release(self, slot: int) -> None:
        """Unlock a slot this process claimed (its counts stay in the segment)."""
        with self._guard:
            if self._pid != os.getpid() or slot not in self._held:
                return  # not ours: a fork child never held its parent's slots
            self._held.discard(slot)
            with contextlib.suppress(OSError):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot, os.SEEK_SET)
            self._close_if_unused()

    def is_alive(self, slot: int) -> bool:
        """True while some live process holds ``slot`` (this one included)."""
        with self._guard:
            if slot in self._held and self._pid == os.getpid():
                return True
            try:
                fd = self._fd_now()
            except OSError:
                return True  # cannot tell: assume alive (waits stay bounded by deadlines)
            try:
                probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0)
                result = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
            finally:
                self._close_if_unused()
        (lock_type, *_rest) = _FLOCK.unpack(result)
        return bool(lock_type != fcntl.F_UNLCK)


def _open_private(path: str) -> int:
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentPermissionError(
                f"refusing {path}: it is a symbolic link; remove it"
            ) from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise SegmentPermissionError(
            f"refusing {path}: it must be a regular 0600 file owned by uid {os.geteuid()}; "
            "remove it"
        )
    return fd


# One OwnerFile per companion file in this process.  Never closed: closing would drop
# the locks of every instance still using it (it is one fd per segment, and empty).
_FILES: dict[str, OwnerFile] = {}
_FILES_GUARD = threading.Lock()


def for_path(segment_path: str) -> OwnerFile:
    """The process-wide :class:`OwnerFile` of a segment (made on first use)."""
    path = owners_path(segment_path)
    with _FILES_GUARD:
        owner_file = _FILES.get(path)
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if owner_file is None or (owner_file.holds_fd and owner_file.inode != current):
            # First use, or the file was removed and made anew (`shmcache rm`): a new
            # lock space.  Instances of the old segment keep the old object.
            owner_file = _FILES[path] = OwnerFile(path)
        return owner_file


def _reset_guards_in_child() -> None:
    # A guard held by another thread at fork stays held in the child forever.
    global _FILES_GUARD
    _FILES_GUARD = threading.Lock()
    for owner_file in _FILES.values():
        owner_file._guard = threading.Lock()


os.register_at_fork(after_in_child=_reset_guards_in_child)
