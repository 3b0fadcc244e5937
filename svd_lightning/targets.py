"""Which modules an adapter wraps, on any Hugging Face causal LM.

The paper's targets are the attention projections (LoRA: q, k, v, o) and, for IA3, those plus the
feed-forward up/down projections. Families name them differently (Llama ``q_proj``, Phi-3's fused
``qkv_proj``, GPT-2's ``c_attn`` -- a ``Conv1D``, not an ``nn.Linear`` --, GPT-NeoX's
``query_key_value``, OPT's ``out_proj``), so the defaults are found by *type and place*, never by a
list of Llama names:

* attention projections: the ``nn.Linear`` / ``Conv1D`` leaves inside a module whose class is an
  attention block (``…Attention``);
* feed-forward projections: the other ``nn.Linear`` / ``Conv1D`` leaves of the repeated decoder
  layers, less gate-only projections (the paper names up and down; SwiGLU's ``gate_proj`` is neither).

Where nothing is found that way, peft's own per-architecture mapping
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_*_MAPPING``) decides; where that has no entry either,
the error lists every candidate module by type, with the setting that fixes it (``target_modules``).
A name that appears in both blocks (GPT-2's ``c_proj``) is qualified by its parent (``attn.c_proj``),
as peft matches a list entry against the end of a module's dotted name.
"""

from __future__ import annotations

import re

import torch


def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _blocks(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(attention, feed_forward)``: full module name -> its qualified-enough name, for every projection
    leaf in an attention block and every other projection leaf of a decoder layer (a ModuleList item)."""
    kinds = _projection_types()
    attention_blocks = [name for name, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    layer_lists = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    attention, feed_forward = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or "." not in name:
            continue
        if any(name.startswith(block + ".") for block in attention_blocks):
            attention[name] = name
        elif any(re.match(re.escape(layers) + r"\.\d+\.", name) for layers in layer_lists):
            feed_forward[name] = name
    return attention, feed_forward


def _short_names(full: list[str], clash: set[str]) -> list[str]:
    """Leaf names, qualified by their parent where the leaf also names a module outside ``full``."""
    out = set()
    for name in full:
        parts = name.split(".")
        out.add(".".join(parts[-2:]) if parts[-1] in clash else parts[-1])
    return sorted(out)


def _peft_mapping(model: torch.nn.Module, kind: str) -> list[str] | None:
    from peft.utils import constants

    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{kind}_MAPPING")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = mapping.get(model_type)
    return list(found) if found else None


def candidates(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every module an adapter could wrap, by type: leaf name -> sorted, for an error message."""
    by_type: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (*_projection_types(), torch.nn.Embedding)) and name:
            by_type.setdefault(type(module).__name__, set()).add(name.rsplit(".", 1)[-1])
    return {kind: sorted(names) for kind, names in sorted(by_type.items())}


def _no_targets(model: torch.nn.Module, what: str) -> ValueError:
    listed = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in candidates(model).items())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"cannot find the {what} of {type(model).__name__} (model_type {model_type!r}: no attention block "
        f"holds an nn.Linear or Conv1D, and peft has no mapping for it). Its candidate modules are {listed}. "
        "Set the adapter's target_modules (e.g. --model.adapter_options '{target_modules: [...]}')")


def attention_targets(model: torch.nn.Module) -> list[str]:
    """The attention projections of ``model`` (LoRA's default targets, the paper's q, k, v, o)."""
    attention, feed_forward = _blocks(model)
    if attention:
        return _short_names(list(attention), {n.rsplit(".", 1)[-1] for n in feed_forward})
    mapped = _peft_mapping(model, "LORA_TARGET_MODULES")
    if mapped:
        return mapped
    raise _no_targets(model, "attention projections")


def feed_forward_targets(model: torch.nn.Module) -> list[str]:
    """The feed-forward up and down projections of ``model`` (IA3's feed-forward modules)."""
    attention, feed_forward = _blocks(model)
    kept = [n for n in feed_forward if not ("gate" in n.rsplit(".", 1)[-1] and "up" not in n.rsplit(".", 1)[-1])]
    if kept:
        return _short_names(kept, {n.rsplit(".", 1)[-1] for n in attention})
    mapped = _peft_mapping(model, "IA3_FEEDFORWARD_MODULES")
    if mapped:
        return mapped
    raise _no_targets(model, "feed-forward projections")
