"""Atomic file writes and path checks shared by the exporters."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

__all__ = ["atomic_write_json", "atomic_write_text", "check_relative_posix", "output_file_problem"]

_UMASK = os.umask(0o022)   # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file could not be written at ``path`` (its folder is missing or takes no new file,
    or ``path`` is a folder), or None: checked before long work whose result goes there."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        return f"output folder does not exist: {out_dir}"
    if os.path.isdir(path):
        return f"{path} is a folder; give the name of the file to write"
    try:
        fd, probe = tempfile.mkstemp(prefix=".trex2-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write to the output folder {out_dir}: {e}"
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same folder, fsync, os.replace.
    The file gets the permissions of the file it replaces, or those a plain open() would give."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        os.fchmod(fd, mode)   # mkstemp makes it private (0600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file; FileNotFoundError / ValueError name `what` ("COCO file", ...) and the path."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from e


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """Serialise ``obj`` as strict JSON (NaN/inf rejected) and write it atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def check_relative_posix(file_name, *, allow_parent: bool = False, what: str = "file_name") -> str:
    """Validate and normalise a relative POSIX path (str or PurePath); returns the str form.

    Rejects absolute paths, backslashes, empty/'.' components and (unless ``allow_parent``)
    '..' components, each with a ValueError naming the path.
    """
    if isinstance(file_name, os.PathLike):
        file_name = Path(file_name).as_posix()
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{what} must be a non-empty string, got {file_name!r}")
    if "\\" in file_name:
        raise ValueError(f"{what} {file_name!r} must use POSIX '/' separators")
    p = PurePosixPath(file_name)
    if p.is_absolute() or (len(file_name) > 1 and file_name[1] == ":"):
        raise ValueError(f"{what} {file_name!r} must be a relative path")
    parts = file_name.split("/")
    if any(part in ("", ".") for part in parts):
        raise ValueError(f"{what} {file_name!r} is not normalised (empty or '.' component)")
    if not allow_parent and ".." in parts:
        raise ValueError(f"{what} {file_name!r} must not contain '..'")
    return file_name
