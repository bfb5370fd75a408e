"""Ray's storage path as a local folder or an object-store URI, read and written the same way.

``storage_path`` may be an absolute local (shared) folder or a URI that ``pyarrow.fs`` opens,
as Ray Tune and Ray Train do: ``s3://BUCKET/ray-results`` (endpoint from ``AWS_ENDPOINT_URL``,
credentials from the usual AWS variables or the instance profile), or with the endpoint in the
URI, ``s3://BUCKET/ray-results?endpoint_override=HOST:PORT&scheme=http``, ``gs://...``.
The helpers here keep such a query string at the end when joining, so that every file the
platform writes beside Ray's (placement records, target reports, sweep state) goes where Ray's go.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ssvp.paths import is_uri

__all__ = ["join", "is_remote", "filesystem", "write_text", "read_text", "exists", "is_dir", "list_dirs",
           "download", "local_path"]


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
