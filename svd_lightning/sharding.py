"""Sharded models (FSDP2): the peft model's weights split across ranks, and forwards in lockstep.

Lightning's ``ModelParallelStrategy`` builds a ``DeviceMesh`` and calls
:meth:`svd_lightning.module.SteeringLM.configure_model`, which calls :func:`shard_model`: every
decoder layer and then the transformer itself become FSDP2 units (``fully_shard``). The
transformer is the root unit because every forward we run reaches it through ``__call__`` --
training, scoring and calibration through the peft model, and ``generate``, whose decoding loop
calls the transformer directly. So the pre-trained distribution is the same weights with the
adapter switched off (``disable_adapter`` around a forward that gathers them) or the base rows of
a one-forward batch, as without sharding.

**Lockstep.** A sharded forward all-gathers each unit's weights: every rank must run the same
number of forwards, but how many a batch takes depends on its data (a cached prefix, a beam that
ends early, a rank with one calibration batch fewer). Inside :func:`lockstep`, every forward is
preceded by a vote (an all-reduce of "I have a forward to run"), and a rank that is done runs
throw-away one-token forwards until every rank is: transformers' ``synced_gpus`` idea, for any
sequence of forwards, not only ``generate``'s.

Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) are refused: peft embeds their
virtual tokens with the word embeddings *outside* the transformer's forward and keeps their
encoder outside it, where FSDP has not gathered the weights (and would not reduce its gradients).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SHARDABLE_ADAPTERS = ("lora", "ia3")


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def unshardable(model) -> str | None:
    """Why ``model`` (a peft model) cannot be sharded, or None."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return f"{type(model).__name__} is not a peft model"
    if getattr(config, "is_prompt_learning", False):
        method = str(getattr(config, "peft_type", "")).split(".")[-1].lower()
        return (f"adapter {method!r} cannot be sharded: peft embeds its virtual tokens outside the transformer's "
                f"forward, where FSDP has not gathered the weights; shard {' or '.join(SHARDABLE_ADAPTERS)} "
                "adapters, or use strategy ddp")
    return None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer's repeated blocks (its ``_no_split_modules``): one FSDP unit each."""
    base = model.get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules): cannot tell "
                         "which modules to shard")
    return layers


def shard_model(model, mesh, mp_policy=None):
    """FSDP2 over ``mesh`` (a 1-D data-parallel mesh): each decoder layer, then the transformer as root.

    Frozen and trainable (adapter) weights share a unit: FSDP2 shards per parameter, so frozen
    weights get no gradient buffers. ``mp_policy``: an FSDP ``MixedPrecisionPolicy`` (default: the
    weights' own dtype). Returns ``model``, sharded in place.
    """
    reason = unshardable(model)
    if reason:
        raise ValueError(reason)
    _, fully_shard = _fsdp()
    options = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model.get_base_model(), **options)
    return model


def is_sharded(model) -> bool:
    FSDPModule, _ = _fsdp()
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Lockstep:
    def __init__(self, model):
        self.root = model.get_base_model()
        self.device = next(model.parameters()).device
        self.idle = False
        self.forwards = 0  # this rank's own forwards in the region
        self.idle_forwards = 0

    def vote(self, busy: bool) -> bool:
        """True when some rank has a forward to run."""
        flag = torch.tensor([1.0 if busy else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def before_forward(self, module, args, kwargs):
        if not self.idle:
            self.forwards += 1
            self.vote(True)

    @torch.no_grad()
    def finish(self) -> None:
        """Throw-away forwards until no rank has one of its own to run."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.idle = True
        while self.vote(False):
            self.root(input_ids=token, use_cache=False)
            self.idle_forwards += 1


_ACTIVE: dict[int, _Lockstep] = {}


@contextlib.contextmanager
def lockstep(model) -> Iterator[_Lockstep | None]:
    """Every rank runs the same number of forwards of ``model`` inside this block (see the module doc).

    Yields the region's counters (``forwards``, ``idle_forwards``, complete once the block has
    exited), or None where it is a no-op.

    Enter it at the same point on every rank, around all the forwards whose count may differ by
    rank (a whole calibration pass, a scoring batch, all of a rank's generation). A no-op for a
    model that is not sharded, in one process, or inside another ``lockstep`` of the same model.
    An exception inside leaves the other ranks waiting, as any failed collective does.
    """
    if _world() == 1 or id(model) in _ACTIVE or not is_sharded(model):
        yield None
        return
    step = _ACTIVE[id(model)] = _Lockstep(model)
    # Before FSDP's own pre-forward hook (prepend), so the vote precedes the forward's all-gathers.
    handle = step.root.register_forward_pre_hook(step.before_forward, prepend=True, with_kwargs=True)
    try:
        yield step
        step.finish()
        step.root.reshard()  # FSDP keeps the root's weights whole after a forward (for a backward): free them
    finally:
        handle.remove()
        del _ACTIVE[id(model)]


def full_adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The adapter's weights (the keys peft saves, under ``model.state_dict()``'s names) as whole
    tensors on the CPU, gathered from every rank; None when ``model`` is not sharded. A collective:
    call it on every rank."""
    if not is_sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    prefix = model.base_model.prefix  # peft's name mark of its adapter weights: "lora_", "ia3_"
    state = {}
    for name, value in model.state_dict().items():
        if prefix in name:
            state[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
    return state


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a ``DTensor``), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(model) -> tuple[int, int]:
    """``(this rank's bytes, all ranks' bytes)`` of the model's parameters."""
    own = total = 0
    for p in model.parameters():
        local = local_tensor(p)
        own += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return own, total
