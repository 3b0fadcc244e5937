"""The configs the package ships, found by name: ``--config tiny``, ``--config truthfulqa/lora``, as litgpt finds
its recipes. They are package data (``svd_lightning/configs``), read through importlib.resources; a path
that exists always wins over a name. Light: no torch or Lightning here, so ``--help`` answers at once."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from svd_lightning.log import InputError


def configs_dir() -> Path:
    return Path(str(files("svd_lightning") / "configs"))


def config_names() -> list[str]:
    """The configs the package ships, by name: ``tiny``, ``truthfulqa/lora``, ``paper/llama-3.1-8b-lora``, …"""
    root = configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if p.parent.name != "_base")


def packaged_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` (or ``-c NAME``) with a shipped config's name instead of a file: that file, found
    with importlib.resources, as litgpt finds its recipes. A path that exists always wins."""
    out, take = [], False
    for arg in argv:
        value, prefix = arg, ""
        if arg.startswith("--config="):
            prefix, value = "--config=", arg[len("--config="):]
        if (take or prefix) and not Path(value).exists():
            name = value.removesuffix(".yaml").removeprefix("configs/")
            shipped = configs_dir() / f"{name}.yaml"
            if shipped.is_file():
                value = str(shipped)
            elif "/" not in value and "." not in value:
                raise InputError(f"--config {value}: no such file and no shipped config of that name "
                                 f"(shipped: {', '.join(config_names())})")
        out.append(prefix + value)
        take = arg in ("--config", "-c")
    return out
