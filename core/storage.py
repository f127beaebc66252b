"""One way to read and write files at any location: a local path or any URI `pyarrow.fs` opens.

Local paths take a plain-file fast path (``os.pread`` and buffered writes); everything else goes
through ``pyarrow.fs``. ``s3://`` honours the standard AWS environment variables, including
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers. ``hf://org/name`` reads
a Hugging Face repository through ``huggingface_hub`` without downloading it whole.

Remote operations are retried with backoff (``chatvec.core.storage_retry``) and end, when they keep
failing, in a ``StorageError`` naming the URI; a full local disk is a ``DiskFullError``. All the
``Store`` objects of a process share one client per storage endpoint (``chatvec.core.storage_clients``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from chatvec.core import storage_clients
from chatvec.core.direct_file import open_direct
from chatvec.core.errors import InputError, StorageError
from chatvec.core.storage_retry import ShortReadError, disk_full, first_line, is_disk_full, with_retries


def is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(local_path(uri), *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def resolve(uri: str):
    """Return ``(pyarrow FileSystem, path)`` for a URI. Local paths get a LocalFileSystem.

    Remote filesystems are shared: one client per endpoint and credentials in a process."""
    from pyarrow import fs as pafs

    parsed = urlparse(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    if parsed.scheme == "s3":
        return storage_clients.s3_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme == "hf":
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
            raise InputError("reading hf:// needs huggingface_hub: pip install huggingface_hub") from exc
        return storage_clients.hf_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    try:
        return storage_clients.generic_filesystem(uri)
    except Exception as exc:
        raise InputError(f"cannot open {uri!r}: {exc}. Use a local path, s3://, gs://, hdfs:// or hf://") from exc


class RangeReader:
    """Random access to one file; opened once, read by byte range many times."""

    def __init__(self, store: Store, rel: str) -> None:
        self.name = store.describe(rel)
        self._fd: int | None = None
        self._file = None
        if store.local:
            try:
                self._fd = os.open(store.path(rel), os.O_RDONLY)
            except FileNotFoundError as exc:
                raise InputError(f"{self.name} does not exist") from exc
            except OSError as exc:
                raise InputError(f"cannot open {self.name}: {exc}") from exc
            self.size = os.fstat(self._fd).st_size
        else:
            self._fs, self._path = store.fs, store.path(rel)
            try:
                self.size = with_retries(self.name, "open", self._open)
            except FileNotFoundError as exc:
                raise InputError(f"{self.name} does not exist") from exc

    def _open(self) -> int:
        self._file = self._fs.open_input_file(self._path)
        return self._file.size()

    def _read_remote(self, offset: int, length: int) -> bytes:
        def once() -> bytes:
            if self._file is None:
                self._open()
            try:
                data = self._file.read_at(length, offset)
            except OSError:
                self._drop()  # a stream whose connection died is not reused
                raise
            if len(data) != length:
                self._drop()
                raise ShortReadError(f"short read ({len(data)} of {length} bytes at {offset})")
            return data if isinstance(data, bytes) else bytes(data)

        return with_retries(self.name, f"read {length} bytes at {offset} of", once)

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise InputError(
                f"{self.name}: read of {length} bytes at {offset} is past its end ({self.size} bytes); "
                "the file is truncated"
            )
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            # pread may return short reads on some filesystems; finish them.
            while len(data) < length:
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    raise InputError(f"{self.name}: unexpected end of file at {offset + len(data)}")
                data += more
            return data
        return self._read_remote(offset, length)

    def readinto_at(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` (no intermediate copy for local files)."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise InputError(
                f"{self.name}: read of {length} bytes at {offset} is past its end ({self.size} bytes); "
                "the file is truncated"
            )
        if self._fd is not None:
            done = 0
            while done < length:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise InputError(f"{self.name}: unexpected end of file at {offset + done}")
                done += n
            return
        buf[:] = self.read_at(offset, length)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._drop()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store:
    """A folder-like location. Paths given to its methods are relative to its root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") if not is_local(uri) else uri
        self.local = is_local(uri)
        if self.local:
            self.fs = None
            self.root = os.path.abspath(local_path(uri))
        else:
            self.fs, self.root = resolve(uri)

    # -- naming -------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        if not rel:
            return self.root
        return os.path.join(self.root, rel) if self.local else posixpath.join(self.root, rel)

    def describe(self, rel: str = "") -> str:
        return join(self.uri, rel) if rel else self.uri

    def _retry(self, rel: str, action: str, fn):
        return with_retries(self.describe(rel), action, fn)

    # -- reading ------------------------------------------------------------------------------
    def _info(self, rel: str):
        from pyarrow import fs as pafs

        info = self._retry(rel, "look up", lambda: self.fs.get_file_info(self.path(rel)))
        return info if info.type != pafs.FileType.NotFound else None

    def exists(self, rel: str = "") -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        return self._info(rel) is not None

    def is_file(self, rel: str) -> bool:
        if self.local:
            return os.path.isfile(self.path(rel))
        from pyarrow import fs as pafs

        info = self._info(rel)
        return info is not None and info.type == pafs.FileType.File

    def size(self, rel: str) -> int | None:
        if self.local:
            try:
                return os.path.getsize(self.path(rel))
            except OSError:
                return None
        info = self._info(rel)
        return None if info is None else info.size

    def mtime(self, rel: str) -> float | None:
        """Modification time in seconds since the epoch, or None when the file is missing."""
        if self.local:
            try:
                return os.path.getmtime(self.path(rel))
            except OSError:
                return None
        info = self._info(rel)
        return None if info is None or info.mtime is None else info.mtime.timestamp()

    def read_bytes(self, rel: str) -> bytes:
        try:
            if self.local:
                with open(self.path(rel), "rb") as fh:
                    return fh.read()
            return self._retry(rel, "read", lambda: self._read_remote(rel))
        except FileNotFoundError as exc:
            raise InputError(f"{self.describe(rel)} does not exist") from exc

    def _read_remote(self, rel: str) -> bytes:
        # open_input_file knows the object's size, so a body cut short is caught and retried
        with self.fs.open_input_file(self.path(rel)) as fh:
            size = fh.size()
            data = fh.read()
        if len(data) != size:
            raise ShortReadError(f"short read ({len(data)} of {size} bytes)")
        return data if isinstance(data, bytes) else bytes(data)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_reader(self, rel: str) -> RangeReader:
        return RangeReader(self, rel)

    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix``, recursively, as paths relative to the root, sorted."""
        base = self.path(prefix)
        out: list[str] = []
        if self.local:
            if not os.path.isdir(base):
                return []
            for dirpath, _dirs, files in os.walk(base):
                for f in files:
                    out.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
            return sorted(out)
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        try:
            infos = self._retry(prefix, "list", lambda: self.fs.get_file_info(selector))
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File and info.path.startswith(root):
                out.append(info.path[len(root) :])
        return sorted(out)

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            with self.open_writer(rel) as fh:
                fh.write(data)
            return

        # The whole object is at hand, so a failed upload is simply made again.
        def upload() -> None:
            self._make_parent(rel)
            stream = self.fs.open_output_stream(self.path(rel))
            try:
                stream.write(data)
                stream.close()
            except BaseException:
                self._abandon(rel, stream)
                raise

        self._retry(rel, "write", upload)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def _make_parent(self, rel: str) -> None:
        parent = posixpath.dirname(self.path(rel))
        if parent:
            self.fs.create_dir(parent, recursive=True)

    def _abandon(self, rel: str, stream) -> None:
        """Close a failed upload and remove whatever part of it was published."""
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - the upload already failed; its own error is the one to report
            pass
        try:
            self.delete(rel)
        except Exception:  # noqa: BLE001 - best effort; an incomplete object is never committed anyway
            pass

    @contextmanager
    def open_writer(self, rel: str, direct: bool = False) -> Iterator:
        """A writable stream whose file appears only when the block ends without an error.

        Local files are written to a temporary name and renamed; a full disk ends in a
        ``DiskFullError`` and leaves nothing behind. ``direct``: a local file is written past
        the page cache where the filesystem allows it (``chatvec.core.direct_file``), for large
        files written once. Object stores publish the object when the
        stream closes; on an error the partial object is deleted. A stream cannot be replayed,
        so here each HTTP request is retried (by the AWS SDK) but not the whole upload: a
        caller that can produce its bytes again uses ``write_bytes`` or retries itself.
        """
        target = self.path(rel)
        if self.local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                fh = (direct and open_direct(tmp)) or open(tmp, "wb", buffering=1 << 20)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(self.describe(rel), exc) from exc
                raise
            try:
                yield fh
                fh.close()
                os.replace(tmp, target)
            except BaseException as exc:
                try:
                    fh.close()
                except OSError:  # flushing into a full disk fails again; the file goes anyway
                    pass
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                if is_disk_full(exc):
                    raise disk_full(self.describe(rel), exc) from exc
                raise
            return
        self._retry(rel, "create the folder of", lambda: self._make_parent(rel))
        stream = self._retry(rel, "open for writing", lambda: self.fs.open_output_stream(target))
        try:
            yield stream
            stream.close()
        except BaseException as exc:
            self._abandon(rel, stream)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise StorageError(
                    f"cannot write {self.describe(rel)}: {first_line(exc)}. Check that the storage "
                    f"endpoint is reachable and healthy, then rerun"
                ) from exc
            raise

    def delete(self, rel: str) -> None:
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                self._retry(rel, "delete", lambda: self.fs.delete_file(self.path(rel)))
        except FileNotFoundError:
            pass
