"""Storage in a local directory, with crash-safe (atomic) writes."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from storage.base import StorageError, StorageRefused, safe_key

# Writes no retry mends: the folder's owner, its mode or the mount must change.
_REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self._root = Path(root).resolve()

    @property
    def base_url(self) -> str:
        return self._root.as_uri()

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        # content_type and metadata are accepted for interface parity; a plain file has
        # nowhere to keep them (head() says {}: a reader asks the file itself).
        return self._write(key, lambda out: out.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head(self, key: str) -> dict[str, str] | None:
        return {} if self.size(key) is not None else None

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def presigned_url(self, key: str, expires_s: int) -> str:
        # A local file has no signed form; whoever can read the directory can read it.
        return self.url_for(key)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/"))
        try:
            files = [p for p in folder.rglob("*") if p.is_file()]
        except OSError as exc:
            raise StorageError(f"cannot list {folder}: {exc.strerror or exc}") from exc
        # Temporary files of writes in progress start with '.', which no key may.
        return sorted(k for k in (p.relative_to(self._root).as_posix() for p in files)
                      if all(seg[:1] != "." for seg in k.split("/")))

    def _path(self, key: str) -> Path:
        path = (self._root / safe_key(key)).resolve()
        # safe_key already forbids "..", but a symlink planted inside the root
        # could still point elsewhere; resolving catches that too.
        if not path.is_relative_to(self._root):
            raise StorageError(f"key {key!r} resolves outside the storage root {self._root}")
        return path

    def _write(self, key: str, fill: Callable[[IO[bytes]], object]) -> str:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # The temp name starts with '.', which safe_key never accepts, so it
            # cannot collide with a real key; same directory keeps os.replace atomic.
            tmp = tempfile.NamedTemporaryFile(
                dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp", delete=False
            )
            try:
                with tmp:
                    fill(tmp)
                    tmp.flush()
                    # NamedTemporaryFile creates 0o600; readers (e.g. a web server) need 0o644.
                    os.fchmod(tmp.fileno(), 0o644)
                    os.fsync(tmp.fileno())
                os.replace(tmp.name, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp.name)
                raise
            _fsync_dir(dest.parent)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "")
            kind = StorageRefused if exc.errno in _REFUSALS else StorageError
            raise kind(f"cannot write {dest}: {exc.strerror or exc}", code) from exc
        return dest.as_uri()


def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may be lost on power failure, leaving the
    # old object (or none) even though put_* returned.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
