"""One way to read and write files at any location: a local path or any URI `pyarrow.fs` opens.

Local paths take a plain-file fast path (``os.pread`` and buffered writes); everything else goes
through ``pyarrow.fs``. ``s3://`` honours the standard AWS environment variables, including
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers. ``hf://org/name`` reads
a Hugging Face repository through ``huggingface_hub`` without downloading it whole.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

from merge.errors import InputError


def is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(local_path(uri), *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def _s3_filesystem():
    from pyarrow import fs as pafs

    kwargs: dict = {"allow_bucket_creation": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str):
    """Return ``(pyarrow FileSystem, path)`` for a URI. Local paths get a LocalFileSystem."""
    from pyarrow import fs as pafs

    parsed = urlparse(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    if parsed.scheme == "s3":
        return _s3_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme == "hf":
        try:
            from huggingface_hub import HfFileSystem
        except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
            raise InputError("reading hf:// needs huggingface_hub: pip install huggingface_hub") from exc
        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), (parsed.netloc + parsed.path).rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise InputError(f"cannot open {uri!r}: {exc}. Use a local path, s3://, gs://, hdfs:// or hf://") from exc


class RangeReader:
    """Random access to one file; opened once, read by byte range many times."""

    def __init__(self, store: "Store", rel: str) -> None:
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
            try:
                self._file = store.fs.open_input_file(store.path(rel))
            except FileNotFoundError as exc:
                raise InputError(f"{self.name} does not exist") from exc
            except OSError as exc:
                raise InputError(f"cannot open {self.name}: {exc}") from exc
            self.size = self._file.size()

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise InputError(f"{self.name}: read of {length} bytes at {offset} is past its end ({self.size} bytes); the file is truncated")
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            # pread may return short reads on some filesystems; finish them.
            while len(data) < length:
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    raise InputError(f"{self.name}: unexpected end of file at {offset + len(data)}")
                data += more
            return data
        data = self._file.read_at(length, offset)
        if len(data) != length:
            raise InputError(f"{self.name}: short read ({len(data)} of {length} bytes at {offset})")
        return bytes(data) if not isinstance(data, bytes) else data

    def readinto_at(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` (no intermediate copy for local files)."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise InputError(f"{self.name}: read of {length} bytes at {offset} is past its end ({self.size} bytes); the file is truncated")
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
            self._file.close()
            self._file = None

    def __enter__(self) -> "RangeReader":
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

    def child(self, rel: str) -> "Store":
        return Store(join(self.uri, rel))

    # -- reading ------------------------------------------------------------------------------
    def _info(self, rel: str):
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(self.path(rel))
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
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise InputError(f"{self.describe(rel)} does not exist") from exc

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

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File and info.path.startswith(root):
                out.append(info.path[len(root):])
        return sorted(out)

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_writer(rel) as fh:
            fh.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    @contextmanager
    def open_writer(self, rel: str) -> Iterator:
        """A writable stream whose file appears only when the block ends without an error.

        Local files are written to a temporary name and renamed. Object stores publish the
        object when the stream closes; on an error the partial object is deleted.
        """
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            fh = open(tmp, "wb", buffering=1 << 20)
            try:
                yield fh
                fh.close()
                os.replace(tmp, target)
            except BaseException:
                fh.close()
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            return
        parent = posixpath.dirname(target)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        stream = self.fs.open_output_stream(target)
        try:
            yield stream
            stream.close()
        except BaseException:
            try:
                stream.close()
            finally:
                self.delete(rel)
            raise

    def delete(self, rel: str) -> None:
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass
