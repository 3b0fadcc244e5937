"""Steered generation: SVDecode's next-token distribution inside transformers' ``generate`` (greedy, sampling,
beam search; a ``custom_generate`` loop or a logits processor), and answering prompts with it.

On the one-forward path (:mod:`svd_lightning.forward.rows`) the batch is ``[warm; base]`` rows with one KV
cache, both halves forced onto the same tokens; on the two-pass path the pre-trained pass runs inside the
logits processor with its own cache.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from svd_lightning.config import ConfigError, ForwardMode, SteeringConfig
from svd_lightning.forward.adapter import adapter_disabled, leaves_no_hooks, model_with_adapter, tuner_layers
from svd_lightning.forward.rows import PAIRED, adapter_names, positions, resolve_forward_mode
from svd_lightning.sharding import is_sharded, lockstep
from svd_lightning.steering import policy_log_probs, steering_vector


def steered_next_log_probs(warm: torch.Tensor, base: torch.Tensor, config: SteeringConfig) -> torch.Tensor:
    """SVDecode's next-token log-probs from warm and base logits: −∞ on masked tokens, none masked
    where :attr:`SteeringConfig.mask_in_generation` is False."""
    delta, keep = steering_vector(warm.float(), base.float(), config.alpha, direction=config.direction)
    return policy_log_probs(warm.float(), delta, keep, config.mu, "mask" if config.mask_in_generation else "none")


def _generation_config(config: SteeringConfig) -> SteeringConfig:
    if not isinstance(config, SteeringConfig):
        raise TypeError(f"expected a SteeringConfig, got {type(config).__name__}")
    if config.mu is None:
        raise ConfigError("steered generation needs a strength: SteeringConfig.mu is None")
    return config


class SteeringLogitsProcessor(LogitsProcessor):
    """Two-pass path: turns the warm model's next-token scores into SVDecode's steered log-probs.

    Runs the pre-trained pass (adapter disabled) alongside ``generate`` with its own KV cache: the
    first call encodes the prompt, later calls feed only the newest token. Rows reordered by beam
    search are matched to their parent by prefix, and the base cache is reordered the same way.
    Returns normalised log-probs (−∞ on masked tokens), which greedy, sampling warpers and beam
    search all accept. ``mu=0`` keeps the warm model's ranking among kept tokens (min-p style).
    ``check_model``: at the first step, one warm pass over the prompts checks that ``generate``'s scores
    are ``model``'s with its adapter on (another model's would be steered silently wrong).
    """

    def __init__(self, model, config: SteeringConfig, attention_mask: torch.Tensor | None = None,
                 pad_token_id: int | None = None, check_model: bool = True):
        self.model, self.config = model, _generation_config(config)
        self.check_model = check_model  # off where generate runs on the model itself (one prompt pass saved)
        self.prompt_mask, self.pad_token_id = attention_mask, pad_token_id
        self.cache = None
        self.seen: torch.Tensor | None = None  # the ids whose base pass is in the cache
        self.attn: torch.Tensor | None = None

    @torch.no_grad()
    def base_next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            self._check_prompts(input_ids)
            mask = torch.ones_like(input_ids) if self.prompt_mask is None else self.prompt_mask.to(input_ids.device)
            if mask.shape[0] != input_ids.shape[0]:  # generate expanded rows for beams / num_return_sequences
                mask = mask.repeat_interleave(input_ids.shape[0] // mask.shape[0], dim=0)
            new_ids, self.attn = input_ids, mask
        else:
            if input_ids.shape[1] != self.seen.shape[1] + 1:
                raise ValueError("this SteeringLogitsProcessor already served another generate call (it keeps that "
                                 "call's pre-trained cache): make a new one per call")
            self._follow_reordering(input_ids)
            new_ids = input_ids[:, -1:]
            self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=-1)
        position_ids = positions(self.attn)[:, -new_ids.shape[1] :]
        with adapter_disabled(self.model):
            out = self.model(
                input_ids=new_ids,
                attention_mask=self.attn,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.seen = out.past_key_values, input_ids
        return out.logits[:, -1].float()

    def _check_prompts(self, input_ids: torch.Tensor) -> None:
        """The prompts are the ones the processor was made for: the mask's shape, or (no mask) no left padding."""
        mask = self.prompt_mask
        if mask is not None and (mask.shape[1] != input_ids.shape[1] or input_ids.shape[0] % mask.shape[0]):
            raise ValueError(f"the attention_mask given is {tuple(mask.shape)} but generate's prompts are "
                             f"{tuple(input_ids.shape)}: give the mask of these prompts")
        if mask is None and self.pad_token_id is not None and input_ids.shape[0] > 1 \
                and bool((input_ids[:, 0] == self.pad_token_id).any()):
            raise ValueError("the prompts are left-padded and no attention_mask was given: the pre-trained pass would "
                             "read the padding as text; pass the prompts' attention_mask")

    def _follow_reordering(self, input_ids: torch.Tensor) -> None:
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, self.seen):
            return
        # Beam search reordered rows: each row continues the previous row with the same prefix.
        match = (prefix.unsqueeze(1) == self.seen.unsqueeze(0)).all(-1)  # [new, old]
        if not match.any(-1).all():
            raise RuntimeError("steered generation lost track of a beam (a row with an unseen prefix)")
        parent = match.float().argmax(-1)
        self.cache.reorder_cache(parent)
        self.attn = self.attn[parent]

    @torch.no_grad()
    def _check_scores_model(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """generate's first scores are this processor's model's (adapter on): scores of another model with the
        same vocabulary would be steered silently wrong. Up to a shift per row (beam search hands log-probs);
        the median over the vocabulary ignores the few entries other processors change (repetition penalty)."""
        layers = tuner_layers(self.model)
        if layers and all(layer.disable_adapters for layer in layers):
            raise ValueError("the model generates with its adapter switched off (inside disable_adapter()?): its scores "
                             "are the pre-trained model's, and the processor steers the warm-started model's")
        warm = self.model(input_ids=input_ids, attention_mask=self.attn, position_ids=positions(self.attn)).logits[:, -1]
        tolerance = 16 * torch.finfo(warm.dtype).eps  # the same forward in another batch shape: a few ulps
        warm, scores = warm.float(), scores.float()
        difference = torch.where(torch.isfinite(warm) & torch.isfinite(scores), scores - warm, torch.nan)
        difference = difference - difference.nanmedian(-1, keepdim=True).values  # beam search hands log-probs
        gap = float(difference.abs().nanmedian())
        if gap > tolerance * (1.0 + float(warm.abs().median())):
            raise ValueError(f"generate's scores are not this processor's model's (median |logit difference| {gap:.3g} "
                             "over the vocabulary): call generate on SteeredModel.model, or on your own model that "
                             "carries the run's adapter with logits_processor(mask, model=YOUR_MODEL)")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        first = self.seen is None
        base = self.base_next_logits(input_ids)
        if first and self.check_model:
            self._check_scores_model(input_ids, scores)
        return steered_next_log_probs(scores, base, self.config)


class PairedSteeringLogitsProcessor(LogitsProcessor):
    """One-forward path: rows ``[warm; base]`` of one batch; both halves get the steered log-probs.

    Identical scores in both halves make greedy and beam search pick the same tokens for both, so
    the base rows always see the warm rows' prefix. Later user processors see only the warm half.
    """

    def __init__(self, config: SteeringConfig, then: list | None = None):
        self.config, self.then = _generation_config(config), list(then or [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warm, base = scores.chunk(2)
        out = steered_next_log_probs(warm, base, self.config)
        warm_ids = input_ids[: warm.shape[0]]
        for processor in self.then:
            out = processor(warm_ids, out)
        return PAIRED.expand(out)


class PairedSampler(LogitsProcessor):
    """Draws the next token once per warm row (after the sampling warpers) and forces it on both halves.

    It consumes the global RNG exactly as ``generate``'s own sampling does for the warm rows alone,
    so a seeded one-forward run samples the same tokens as the two-pass path.
    """

    def __init__(self, warpers: list):
        self.warpers = warpers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warm = scores[: scores.shape[0] // 2]
        warm_ids = input_ids[: warm.shape[0]]
        for warper in self.warpers:
            warm = warper(warm_ids, warm)
        token = torch.multinomial(torch.softmax(warm, dim=-1), num_samples=1)
        forced = torch.full_like(warm, float("-inf")).scatter(-1, token, 0.0)
        return PAIRED.expand(forced)


def _sampling_warpers(config) -> tuple[list, str | None]:
    """transformers' sampling warpers for ``config`` in ``generate``'s order, or why we cannot mirror them."""
    unsupported = [k for k in ("top_h", "epsilon_cutoff", "eta_cutoff") if getattr(config, k, None) not in (None, 0.0)]
    if unsupported:
        return [], f"sampling option(s) {unsupported} are only applied by generate itself"
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    return warpers, None


def _first_half(out):
    """The warm rows of ``generate``'s output (a tensor or a ``GenerateOutput``)."""
    if isinstance(out, torch.Tensor):
        return out[: out.shape[0] // 2]
    halved = {}
    for key, value in out.items():
        if key == "past_key_values":
            continue
        if isinstance(value, torch.Tensor):
            halved[key] = value[: value.shape[0] // 2]
        elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            halved[key] = tuple(v[: v.shape[0] // 2] for v in value)
        else:
            halved[key] = value
    return type(out)(**halved)


class _WarmRowsStreamer(BaseStreamer):
    """Hands a streamer only the warm rows of the one-forward batch ``[warm; base]``."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        self.streamer.put(value[: value.shape[0] // 2])

    def end(self):
        self.streamer.end()


def _runs_last(processor) -> bool:
    """The processors ``generate`` appends after the user's: sampling warpers, watermarks, renormalisation."""
    name = type(processor).__name__
    return name.endswith("LogitsWarper") or "Watermark" in name or name == "LogitNormalization"


def steering_decoding_loop(steered_model, config: SteeringConfig):
    """A ``custom_generate`` callable for transformers' ``generate``: its usual decoding loop
    (greedy, sampling or beam search) with SVDecode's two-pass processor put where a user's
    ``logits_processor`` goes (after ``generate``'s own, before the sampling warpers), so every
    option of ``generate`` applies on top of the steered distribution. ``steered_model`` is the
    peft model whose adapter is switched off for the pre-trained pass; ``generate`` may be called on
    it, its inner model, or any model that carries the same adapter weights (:func:`adapter_fingerprint`;
    then that model's own adapter is switched off), and refuses any other."""
    config = _generation_config(config)

    def custom_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                        synced_gpus: bool = False, streamer=None, **model_kwargs):
        steering = model_with_adapter(model, steered_model, "custom_generate")
        processor = SteeringLogitsProcessor(steering, config, attention_mask=model_kwargs.get("attention_mask"),
                                            check_model=False)  # the model is checked by its adapter's weights
        processors = list(logits_processor)
        at = next((i for i, p in enumerate(processors) if _runs_last(p)), len(processors))
        processors.insert(at, processor)
        options = dict(logits_processor=LogitsProcessorList(processors), stopping_criteria=stopping_criteria,
                       generation_config=generation_config, synced_gpus=synced_gpus, **model_kwargs)
        if (generation_config.num_beams or 1) > 1:
            return type(model)._beam_search(model, input_ids, **options)
        return type(model)._sample(model, input_ids, streamer=streamer, **options)

    return custom_generate


def steered_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SteeringConfig, *,
                     forward_mode: ForwardMode = "auto", **generate_kwargs):
    """``model.generate`` with SVDecode under ``config`` (μ̄, α, direction; the mask unless the policy is
    ``none``); all of transformers' decoding options apply on top. ``forward_mode``: see
    :mod:`svd_lightning.forward.rows`.

    Sampling options (temperature, top-k, top-p, …) act on the steered distribution. The one-forward
    path covers greedy, beam search and sampling (also with ``num_return_sequences``); beam
    *sampling* and generate-only warpers (top-h, ε/η cutoffs) use the two-pass path. Processors that
    ``generate`` adds itself (e.g. a repetition penalty) see the base rows too on the one-forward path.
    A sharded model (:mod:`svd_lightning.sharding`) generates in lockstep with the other ranks.
    """
    with lockstep(model):
        return _steered_generate(model, input_ids, attention_mask, config, forward_mode,
                                 **_unsynced(model, generate_kwargs))


def _unsynced(model, generate_kwargs: dict) -> dict:
    """``generate`` options without transformers' ``synced_gpus`` on a sharded model: :func:`lockstep`
    keeps the ranks' forwards together instead, also the two-pass processor's, which ``synced_gpus``
    skips on a rank that is done (so its per-step all-reduce would meet another rank's forward)."""
    return {**generate_kwargs, "synced_gpus": False} if is_sharded(model) else generate_kwargs


@leaves_no_hooks
def _steered_generate(model, input_ids, attention_mask, config, forward_mode, **generate_kwargs):
    config = _generation_config(config)
    extra = list(generate_kwargs.pop("logits_processor", None) or [])
    options = model.generation_config.__class__.from_dict({**model.generation_config.to_dict(), **generate_kwargs})
    sample, beams = bool(options.do_sample), int(options.num_beams or 1)
    warpers, unsupported = _sampling_warpers(options) if sample else ([], None)
    if sample and beams > 1:
        unsupported = "beam sampling draws per beam inside generate"
    if resolve_forward_mode(model, forward_mode, unsupported) == "two_pass":
        processor = SteeringLogitsProcessor(model, config, attention_mask=attention_mask, check_model=False)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              logits_processor=LogitsProcessorList([processor, *extra]), **generate_kwargs)
    kwargs = dict(generate_kwargs, num_beams=beams)  # peft repeats adapter_names per beam only when told
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _WarmRowsStreamer(kwargs["streamer"])
    processors: list = [PairedSteeringLogitsProcessor(config, then=extra)]
    if sample:
        # generate would repeat rows for num_return_sequences but not peft's adapter_names: repeat first.
        copies = int(kwargs.pop("num_return_sequences", None) or 1)
        input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        processors.append(PairedSampler(warpers))
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None, typical_p=None)
    out = model.generate(
        input_ids=PAIRED.expand(input_ids),
        attention_mask=PAIRED.expand(attention_mask),
        adapter_names=adapter_names(model, input_ids.shape[0]),
        logits_processor=LogitsProcessorList(processors),
        **kwargs,
    )
    return _first_half(out)


MODES = ("greedy", "sample", "beam")


def decoding_kwargs(mode: str = "greedy", max_new_tokens: int = 64, num_beams: int = 4,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> dict:
    """``generate`` options for ``mode``, checked here (transformers accepts ``top_p=1.5`` silently);
    sampling options are refused outside ``sample``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def count(name, value, least=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")

    count("max_new_tokens", max_new_tokens)
    count("num_beams", num_beams)
    if top_k is not None:
        count("top_k", top_k)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    warpers = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items() if v is not None}
    if warpers and mode != "sample":
        raise ValueError(f"sampling options ({', '.join(warpers)}) only apply to mode 'sample', not {mode!r}")
    beams = num_beams if mode == "beam" else 1
    return dict(max_new_tokens=max_new_tokens, do_sample=mode == "sample", num_beams=beams, **warpers)


def check_prompts(prompts, tokenizer) -> list[str]:
    """``prompts`` as a list of strings that each give at least one token; errors name the prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts to answer")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not tokenizer(p, add_special_tokens=True)["input_ids"]:
            raise ValueError(f"prompt {i} ({p!r}) gives no tokens: there is nothing to continue")
    return list(prompts)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], config: SteeringConfig, mode: str = "greedy", *,
                     batch_size: int = 8, seed: int = 0, progress: bool = True, with_plain: bool = True,
                     generation: dict | None = None, forward_mode: ForwardMode = "auto", **kw) -> list[dict]:
    """Plain and steered (``config``) continuations of ``prompts`` (left-padded batches); ``kw`` go to
    :func:`decoding_kwargs`, ``generation`` (any other option of transformers' ``generate``, e.g.
    ``repetition_penalty``, ``eos_token_id``, ``streamer``) to ``generate`` as given: transformers
    checks them. A ``streamer`` streams the steered answer.

    ``with_plain=False`` skips the warm model's own answer (``plain`` is then None). Sampling
    reseeds with ``seed + index of the batch's first prompt`` before each answer.
    """
    from svd_lightning.progress import progress_bar

    generation = dict(generation or {})
    clash = sorted(set(generation) & {"do_sample", "num_beams", "max_new_tokens", "temperature", "top_k", "top_p"})
    if clash:
        raise ValueError(f"{clash} are set by the mode and its options (mode, max_new_tokens, num_beams, temperature, "
                         "top_k, top_p), not as extra generate options")
    streamer = generation.pop("streamer", None)
    gen = {**decoding_kwargs(mode, **kw), "pad_token_id": tokenizer.pad_token_id, **generation}
    config = _generation_config(config)
    prompts = check_prompts(prompts, tokenizer)
    rows, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: real tokens must end every row
    try:
        gen = _unsynced(model, gen)
        with progress_bar(f"{mode} decoding", len(prompts), "prompt", enabled=progress) as bar, lockstep(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
                torch.manual_seed(seed + start)
                plain = model.generate(**enc, **gen) if with_plain else None
                torch.manual_seed(seed + start)
                steered = steered_generate(model, enc["input_ids"], enc["attention_mask"], config,
                                           forward_mode=forward_mode, **gen,
                                           **({"streamer": streamer} if streamer is not None else {}))
                n = enc["input_ids"].shape[1]
                decode = lambda out: tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)  # noqa: E731
                for p, a, b in zip(chunk, decode(plain) if with_plain else [None] * len(chunk), decode(steered)):
                    rows.append({"prompt": p, "plain": a, "steered": b, "mu": float(config.mu), "mode": mode})
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
    return rows
