"""Files written whole: atomic writes with the umask's permissions, JSON, portable paths, and the named
fault points the kill and crash tests stop a write at. Used by the run writer and every result file."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any


# -- fault injection ---------------------------------------------------------------------------------
FAULT_ENV = "SVD_LIGHTNING_FAULT"


class InjectedFault(BaseException):
    """Raised at a named point when ``SVD_LIGHTNING_FAULT=<point>`` is set (tests of kills and crashes).

    A BaseException, like the KeyboardInterrupt of a kill: no ``except Exception`` swallows it.
    """


def fault_point(name: str) -> None:
    """A named moment of writing a run. ``SVD_LIGHTNING_FAULT=<name>`` raises :class:`InjectedFault`
    there, ``<name>:kill`` sends this process SIGKILL (nothing runs after it), ``<name>:term`` SIGTERM."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, action = spec.rpartition(":") if spec.endswith((":kill", ":term", ":raise")) else (spec, "", "raise")
    if point != name:
        return
    if action in ("kill", "term"):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
    raise InjectedFault(name)


# -- files ----------------------------------------------------------------------------------------------
def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give ``root`` and everything in it the umask's permissions (tools like safetensors write 0600)."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``path`` whole (a temporary sibling renamed over it), with the umask's permissions."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write_text` for bytes (a figure)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files: others could not read a shared run
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a result file should record it: relative to the working directory when below it,
    else from its ``runs/`` folder on (or its last three parts), never a machine's absolute path."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        parts = path.parts
        start = max((i for i, part in enumerate(parts) if part == "runs"), default=len(parts) - 3)
        return Path(*parts[max(start, 1):]).as_posix()


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads(..., object_pairs_hook=unique_keys)``: a key given twice in one object is an error (json
    keeps the last value silently, so a hand-edited file would load what nobody meant)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"duplicate key(s) {repeated} in one object")
    return dict(pairs)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=jsonable) + "\n")


def jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
