"""Files written whole or not at all, readable as any new file of the user's is."""
from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path


def current_umask() -> int:
    # Linux reports it without changing it; os.umask would set it process-wide for a moment, which
    # another thread creating files (a server saving while it serves) could observe
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file (no folder) that `path` or one of its parents is, where a folder would have to be made
    for it ("out.txt/run"), else None: found before long work, not when its result is written."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def staged_file(path: str | os.PathLike, data: bytes) -> Path:
    """`data` written to a temporary file beside `path`, for the caller to rename into place
    (os.replace) once everything it writes is ready, or to delete. The file gets the permissions the
    umask gives a new file (mkstemp's own are owner-only), so a server running as another user can
    read it."""
    path = Path(path)
    # in the target's folder, so os.replace is a rename, never a copy
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, renamed into place: a crash
    mid-write never leaves a truncated file."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """write_text_atomically for bytes; a failure leaves neither a half file nor the temporary one."""
    tmp = staged_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


# a file system that takes no hard links (FAT, some network shares) answers os.link with one of these
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


def move_without_replacing(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished temporary file `tmp` (staged_file's, beside `path`) at `path`, unless something
    is there by now: FileExistsError then, `tmp` kept for the caller. A check before a rename leaves a
    moment in which a file another program writes there would be replaced; a hard link is refused
    atomically where the name is taken (a dangling link there too). Where the file system takes no
    hard links, `path` is made with O_EXCL and the data copied in (a failure removes it)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out, open(tmp, "rb") as data:
                shutil.copyfileobj(data, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
    Path(tmp).unlink()


def reader_stopped_reading() -> None:
    """For a BrokenPipeError on stdout: its reader stopped (`| head`), having taken what it wanted, and
    nothing went wrong. stdout goes to /dev/null, so the interpreter's last flush does not fail the
    same way on exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
