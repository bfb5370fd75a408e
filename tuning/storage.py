"""Ray's storage path as a local folder or an object-store URI, read and written the same way.

``storage_path`` may be an absolute local (shared) folder or a URI that ``pyarrow.fs`` opens,
as Ray Tune and Ray Train do: ``s3://BUCKET/ray-results`` (endpoint from ``AWS_ENDPOINT_URL``,
credentials from the usual AWS variables or the instance profile), or with the endpoint in the
URI, ``s3://BUCKET/ray-results?endpoint_override=HOST:PORT&scheme=http``, ``gs://...``.
The helpers here keep such a query string at the end when joining, so that every file the
platform writes beside Ray's (placement records, target reports, sweep state) goes where Ray's go.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ssvp.paths import is_uri

__all__ = ["join", "is_remote", "filesystem", "write_text", "read_text", "exists", "is_dir", "list_dirs",
           "download", "upload_dir", "delete_dir", "local_path", "as_uri", "RemotePath", "storage_path",
           "local_copy"]


def is_remote(uri: str | os.PathLike) -> bool:
    return is_uri(str(uri)) and not str(uri).startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``; a URI's ``?query`` (endpoint override) stays at the end."""
    base = str(base)
    if not is_remote(base):
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *[p.strip("/") for p in parts]]) + (sep + query if sep else "")


def filesystem(uri: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)`` of a local path or URI."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        return pafs.FileSystem.from_uri(str(uri))
    return pafs.LocalFileSystem(), str(Path(str(uri).removeprefix("file://")).expanduser().resolve())


def local_path(uri: str | os.PathLike) -> Path | None:
    """The local folder of ``uri``, or None for an object store."""
    return None if is_remote(uri) else Path(str(uri).removeprefix("file://")).expanduser()


def write_text(uri: str | os.PathLike, text: str) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str | os.PathLike) -> str | None:
    """The file's text, or None when it is missing or unreadable."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (OSError, ValueError):
        return None


def _info(uri: str | os.PathLike):
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        return fs.get_file_info(path), pafs
    except (OSError, ValueError):
        return None, pafs


def exists(uri: str | os.PathLike) -> bool:
    info, pafs = _info(uri)
    return info is not None and info.type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    info, pafs = _info(uri)
    return info is not None and info.type == pafs.FileType.Directory


def list_dirs(uri: str | os.PathLike) -> list[tuple[str, float]]:
    """``(name, mtime seconds)`` of the folders directly under ``uri`` (empty when it is missing)."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return []
    out = []
    for i in infos:
        if i.type == pafs.FileType.Directory:
            mtime = i.mtime.timestamp() if i.mtime is not None else 0.0
            out.append((i.base_name, mtime))
    return out


def download(uri: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the folder (or file) at ``uri`` to the local ``dest``; returns ``dest``."""
    import pyarrow.fs as pafs

    dest = Path(dest)
    local = local_path(uri)
    if local is not None:
        if local.is_dir():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, dest)
        return dest
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        dest.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload_dir(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy the local folder ``local`` to ``uri`` (a local path or an object-store prefix)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_dir(uri: str | os.PathLike) -> None:
    """Remove the folder at ``uri`` and everything under it (nothing when it is missing)."""
    local = local_path(uri)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def as_uri(path: str | os.PathLike, like: str | os.PathLike | None) -> str:
    """A path Ray reports inside a remote filesystem (``bucket/ray/x/checkpoint_...``, no scheme) as a
    URI of the same store as ``like`` (scheme and endpoint query); local paths and URIs unchanged."""
    path = str(path)
    if like is None or not is_remote(like) or is_uri(path):
        return path
    scheme = str(like).split("://", 1)[0]
    _, sep, query = str(like).partition("?")
    return f"{scheme}://{path.lstrip('/')}" + (sep + query if sep else "")


class _Stat:
    def __init__(self, mtime: float):
        self.st_mtime = mtime


class RemotePath:
    """The part of ``pathlib.Path`` the platform uses, on an object store URI (see :func:`storage_path`)."""

    def __init__(self, uri: str):
        self.uri = str(uri)

    def __truediv__(self, part: str | os.PathLike) -> "RemotePath":
        return RemotePath(join(self.uri, str(part)))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return self.uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        head, sep, query = self.uri.partition("?")
        return RemotePath(head.rstrip("/").rsplit("/", 1)[0] + (sep + query if sep else ""))

    def exists(self) -> bool:
        return exists(self.uri)

    def is_dir(self) -> bool:
        return is_dir(self.uri)

    def is_file(self) -> bool:
        return exists(self.uri) and not is_dir(self.uri)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        fs, path = filesystem(self.uri)
        fs.create_dir(path, recursive=True)

    def read_text(self) -> str:
        text = read_text(self.uri)
        if text is None:
            raise FileNotFoundError(self.uri)
        return text

    def write_text(self, text: str) -> int:
        write_text(self.uri, text)
        return len(text)

    def iterdir(self):
        import pyarrow.fs as pafs

        fs, path = filesystem(self.uri)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            yield self / info.base_name

    def stat(self) -> _Stat:
        fs, path = filesystem(self.uri)
        info = fs.get_file_info(path)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        if info.type.name == "Directory" and not mtime:  # object stores keep no folder times: newest entry
            mtime = max((c.stat().st_mtime for c in self.iterdir() if not c.is_dir()), default=0.0)
        return _Stat(mtime)


def storage_path(uri: str | os.PathLike) -> "Path | RemotePath":
    """``Path`` for a local folder, :class:`RemotePath` for an object-store URI: the same calls on both."""
    return RemotePath(str(uri)) if is_remote(uri) else Path(str(uri).removeprefix("file://")).expanduser()


@contextlib.contextmanager
def local_copy(path: "str | os.PathLike | RemotePath"):
    """A local folder or file with the content of ``path``: itself when local, a temporary download otherwise."""
    if not is_remote(str(path)):
        yield Path(str(path).removeprefix("file://"))
        return
    tmp = Path(tempfile.mkdtemp(prefix="ssvp-storage-"))
    try:
        name = RemotePath(str(path)).name or "item"
        yield download(str(path), tmp / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
