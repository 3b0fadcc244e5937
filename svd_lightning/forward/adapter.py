"""The peft adapter as the steering code sees it: switched off for the pre-trained distribution (no second
copy of the weights), recognised by its weights, and left clean when a call fails."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Iterator


def tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def uses_virtual_tokens(model) -> bool:
    """Prompt tuning / P-tuning: peft prepends virtual positions to every call's logits."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The pre-trained model from the same weights: peft's ``disable_adapter`` (no copy); on a model whose
    adapter layers peft injected but that is not the ``PeftModel`` itself (what ``generate`` hands a
    ``custom_generate``), those layers switched off and back."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    layers = tuner_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no adapter to disable; wrap it with peft first")
    was = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in zip(layers, was):
            layer.enable_adapters(not disabled)


def adapter_fingerprint(model) -> str:
    """SHA-256 of the adapter weights injected in ``model`` (in module order): equal for two models that
    carry the same adapter, whether wrapped by ``PeftModel`` or not."""
    h = hashlib.sha256()
    for layer in tuner_layers(model):
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):  # the adapter's own weights, not the wrapped layer's
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_with_adapter(model, steered_model, who: str):
    """The model whose adapter is switched off for the pre-trained pass when ``model`` generates:
    ``steered_model`` when ``model`` is it or inside it, else ``model`` itself if it carries the same adapter
    weights (:func:`adapter_fingerprint`); any other model is refused (its scores are not the run's)."""
    if any(model is m for m in steered_model.modules()):
        return steered_model
    if not tuner_layers(model) or adapter_fingerprint(model) != adapter_fingerprint(steered_model):
        raise ValueError(f"{who} steers with the run's adapter, and this {type(model).__name__} carries another one "
                         "(or none): load the run's adapter/ into it (PeftModel.from_pretrained(base, RUN/adapter)), "
                         "or generate with the run's model")
    return model


def leaves_no_hooks(fn):
    """On an error, remove the forward hooks the call left on the model's modules.

    peft registers per-row ``adapter_names`` hooks around a forward / ``generate`` and removes them
    only when the call returns: an exception inside it (an empty prompt, a bad option) would leave
    them behind and break every later call on the same model.
    """
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        before = {id(m): set(m._forward_pre_hooks) for m in model.modules()}
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            for m in model.modules():
                for key in set(m._forward_pre_hooks) - before.get(id(m), set()):
                    m._forward_pre_hooks.pop(key, None)
                    m._forward_pre_hooks_with_kwargs.pop(key, None)
            raise
    return wrapper
