"""The run directory: adapter (peft ``save_pretrained``), ``steering.json``, ``metrics.json``.

Every write goes to a temporary sibling first and is renamed into place, so a run killed midway
leaves the previous files intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_DIR = "adapter"
STEERING_FILE = "steering.json"
METRICS_FILE = "metrics.json"


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def save_adapter(model, run_dir: str | Path) -> Path:
    """``save_pretrained`` into a temp folder, then swap it in place of the old adapter."""
    final = Path(run_dir) / ADAPTER_DIR
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".adapter."))
    try:
        model.save_pretrained(tmp)
        old = final.with_name(f".{ADAPTER_DIR}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint of the vocabulary, to catch a run reused with another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
