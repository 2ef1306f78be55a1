"""``--pidfile``: one file naming the running worker, refused while its owner lives.

Created with O_EXCL so two workers started at once cannot both win; a file left by a
process that died (kill -9, power loss) is taken over, as Celery and gunicorn do.
"""
from __future__ import annotations

import errno
import os

from amqprpc.errors import PidFileError  # re-exported: its home was here


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class PidFile:
    """Write this process's pid to ``path`` on :meth:`acquire`; remove it on :meth:`release`
    (only if it still names us)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._owned = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self.read()
                if other is not None and other != os.getpid() and _alive(other):
                    raise PidFileError(f"pidfile {self.path} names running process {other}") from None
                try:
                    os.unlink(self.path)  # stale: its process is gone
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            self._owned = True
            return
        raise PidFileError(f"pidfile {self.path}: another process raced us for it")

    def read(self) -> int | None:
        try:
            with open(self.path) as handle:
                return int(handle.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._owned and self.read() == os.getpid():
            try:
                os.unlink(self.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self._owned = False

    def __enter__(self) -> "PidFile":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
