"""A finished run in your own code: score choices and generate with SVDecode, no Trainer.

    from svd_lightning import SteeredModel

    sm = SteeredModel.from_pretrained("runs/truthfulqa-lora/version_0")   # a run directory or a Hub repo id
    sm.score("Q: What is the capital of France?\\nA:", [" Paris.", " Lyon."])
    # {'plain': [...], 'base': [...], 'steered': [...]}   summed log-likelihood of each choice
    sm.generate(["Q: What happens if you crack your knuckles a lot?\\nA:"], max_new_tokens=32)
    sm.save_pretrained("my-run")       # adapter/ + steering.json + README.md (the model card)
    sm.push_to_hub("me/my-run")        # the same files, as a Hub model repo

In plain ``transformers`` code, on the run's model (``sm.model``):
``model.generate(**enc, custom_generate=sm.custom_generate)`` or
``model.generate(**enc, logits_processor=LogitsProcessorList([sm.logits_processor(enc["attention_mask"])]))``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.config import (ConfigError, ForwardMode, Method, SolverSettings, SteeringConfig, check_forward_mode,
                                  check_strength)
from svd_lightning.forward.adapter import model_with_adapter
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.generation import MODES, SteeringLogitsProcessor, check_prompts, generate_answers, steering_decoding_loop
from svd_lightning.log import say
from svd_lightning.precision import check_steering_precision
from svd_lightning.run import METRICS_FILE, RunError, RunWriter, SteeringRun, adapter_kind, load_run
from svd_lightning.scoring import score_choices

# SteeredModel.generate's own options (generation.decoding_kwargs); any other keyword goes to generate.
_MODE_OPTIONS = ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class SteeredModel:
    """A peft model, its tokenizer and the :class:`~svd_lightning.config.SteeringConfig` of a run.

    Build one with :meth:`from_run_dir`, or from a peft model you hold
    (``SteeredModel(module.model, module.tokenizer, module.steering_config, gamma=module.gamma)``).
    ``config.mu`` must be set (a run always has it); ``gamma`` (the contrastive baseline's γ, when the run
    fit one) adds a ``contrastive`` score and ``generate(..., method="contrastive")``. ``forward_mode``: how
    the two distributions are computed (:mod:`svd_lightning.forward.rows`; the scores are the same).
    """

    model: torch.nn.Module
    tokenizer: object
    config: SteeringConfig
    max_length: int = 512
    run_dir: str | None = None
    run: SteeringRun | None = None  # the record it was loaded from (save_pretrained keeps its provenance)
    gamma: float | None = None
    forward_mode: ForwardMode = "auto"
    prefixes: PrefixCache = field(default_factory=PrefixCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, SteeringConfig):
            raise TypeError(f"config must be a SteeringConfig, got {type(self.config).__name__}")
        where = f"SteeredModel{f' (run {self.run_dir})' if self.run_dir else ''}"
        if self.config.mu is None:
            raise ConfigError(f"{where}: config.mu is None; a steered model needs a strength")
        check_strength(self.gamma, "gamma", where)
        check_forward_mode(self.forward_mode, where)
        self.model.eval()
        check_steering_precision(self.model, self.config.mu, f"SteeredModel{f' ({self.run_dir})' if self.run_dir else ''}")

    @classmethod
    def from_run_dir(cls, path: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                     forward_mode: ForwardMode = "auto", **overrides) -> "SteeredModel":
        """Load ``path``'s base model + adapter + settings; ``overrides`` replace decode settings (e.g.
        ``mu=0.0``), checked by :meth:`SteeringConfig.replace`; ``forward_mode``: see the class.

        ``base_model``: the base model to load (a folder, ``.gguf`` or Hub id) instead of the one the run names;
        a run that names a local path needs it, or its folder in ``$SVD_LIGHTNING_MODEL_DIRS``
        (:mod:`svd_lightning.run.loading`). Its tokenizer must be the run's.

        ``dtype`` (default float32): the weights' dtype. float32 is the rule of ``svd-lightning``'s
        own scoring whatever the warm start's precision: a steered distribution adds μ̄·δ, δ the
        difference of two almost equal distributions, and bf16 logits' rounding moves it by nats
        at the μ̄ this method solves. ``dtype="bfloat16"`` trades that for speed and memory, with a
        :class:`~svd_lightning.precision.SteeringPrecisionWarning` that states the measured error at μ̄.
        """
        model, tokenizer, run = load_run(path, base_model)
        config = run.steering.replace(**overrides)
        if dtype is not None:
            if isinstance(dtype, str) and dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
            model = model.to(_DTYPES.get(dtype, dtype))
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, config, run_dir=str(path), run=run, gamma=run.contrastive_gamma,
                   forward_mode=forward_mode)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        base_model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, forward_mode: ForwardMode = "auto",
                        **overrides) -> "SteeredModel":
        """A run from a local directory or a Hugging Face Hub model repo (``"user/run"``, at ``revision``).

        Hub repos are fetched with ``huggingface_hub.snapshot_download`` into its cache; with
        ``HF_HUB_OFFLINE=1`` the cached snapshot is used and nothing is downloaded. The run's base
        model is loaded as its ``steering.json`` names it. ``base_model``, ``device``, ``dtype``,
        ``forward_mode``, ``overrides``: see :meth:`from_run_dir`.
        """
        local = os.path.expanduser(os.fspath(name_or_path))
        if not os.path.isdir(local):
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

            try:
                local = snapshot_download(repo_id=os.fspath(name_or_path), revision=revision)
            except HFValidationError as err:
                raise RunError(f"{name_or_path!r} is neither a run directory nor a Hub repo id ({err})") from None
            except LocalEntryNotFoundError as err:
                raise RunError(f"Hub repo {name_or_path!r}{f' at {revision}' if revision else ''} is not in the local "
                               f"cache and cannot be fetched here (offline or unreachable): {err}") from None
        elif revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {name_or_path} is a local directory")
        return cls.from_run_dir(local, base_model=base_model, device=device, dtype=dtype, forward_mode=forward_mode,
                                **overrides)

    def steering_run(self) -> SteeringRun:
        """The run record of this model with its current settings (provenance kept from the loaded run)."""
        if self.run is not None:
            solver = self.run.solver
            if self.config.mu != self.run.steering.mu:  # set by hand now: no longer what the run's solver gave
                solver = SolverSettings(strength="fixed")
            return dataclasses.replace(self.run, steering=self.config, solver=solver, contrastive_gamma=self.gamma)
        peft_config = getattr(self.model, "peft_config", {}).get(getattr(self.model, "active_adapter", None))
        if peft_config is None or adapter_kind(peft_config.peft_type) is None:
            raise RunError("save_pretrained needs a peft model with an adapter svd-lightning knows (SteeredModel.model "
                           f"has {getattr(peft_config, 'peft_type', 'no active peft adapter')})")
        if not peft_config.base_model_name_or_path:
            raise RunError("save_pretrained: the adapter does not record its base model (peft's "
                           "base_model_name_or_path is empty), so the run could not be loaded again: build the base "
                           "with from_pretrained(NAME) before wrapping it, or set "
                           "model.peft_config[model.active_adapter].base_model_name_or_path = NAME")
        return SteeringRun(model=str(peft_config.base_model_name_or_path), steering=self.config,
                           solver=SolverSettings(strength="fixed"), contrastive_gamma=self.gamma,
                           adapter=adapter_kind(peft_config.peft_type))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write this model as a run: ``adapter/`` (peft's format), ``steering.json`` and ``README.md``
        (the model card, with the source run's results when it had a ``metrics.json``).

        Written whole or not at all, like every run; an existing directory is never written into
        (the next free name is used, and said). Returns the directory written."""
        run = self.steering_run()  # checked before anything is written
        writer = RunWriter(save_directory)
        try:
            writer.write_run(self.model, run, self.tokenizer)
            source = Path(self.run_dir) / METRICS_FILE if self.run_dir else None
            if source is not None and source.is_file():
                if (self.config, self.gamma) == (self.run.steering, self.run.contrastive_gamma):
                    # the source run's scores are this model's
                    text = source.read_text(encoding="utf-8")
                    try:
                        json.loads(text)
                    except ValueError as err:
                        raise RunError(f"{source}: not valid JSON ({err}); the run's scores file is damaged: restore "
                                       f"it, or move it away to save the run without its scores") from None
                    writer.write_text(METRICS_FILE, text)
                else:
                    say(f"{save_directory}: the settings differ from run {self.run_dir}'s, so its scores are not "
                        "copied (they were measured at its settings)")
            return writer.commit()
        except OSError as err:
            writer.discard()
            raise RunError(f"could not write run {save_directory} ({err.strerror or err}: {err.filename or ''}); "
                           "nothing was written there") from err
        except BaseException:
            writer.discard()
            raise

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload SVDecode run") -> str:
        """:meth:`save_pretrained` into a temporary directory, then upload it as the model repo
        ``repo_id`` (created if needed) with ``huggingface_hub``; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "run")
            card = (folder / "README.md").read_text(encoding="utf-8")
            (folder / "README.md").write_text(card.replace("path/to/this/run", repo_id), encoding="utf-8")
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message))
            except Exception as err:  # noqa: BLE001 -- no network, no token, refused: one message, whatever the cause
                first = str(err).strip().splitlines()
                raise RunError(f"push_to_hub {repo_id!r}: the Hub could not be reached or refused the upload "
                               f"({type(err).__name__}: {first[0] if first else ''}); nothing was uploaded (one "
                               "commit or none). save_pretrained(DIR) keeps the run locally") from err

    # -- steering from plain transformers -------------------------------------------------------------
    def logits_processor(self, attention_mask: torch.Tensor | None = None, method: Method = "svdecode", model=None):
        """A ``LogitsProcessor`` for your own ``generate`` call: SVDecode's steered log-probs from the adapter's
        scores and a pre-trained pass it runs alongside (two-pass path). ``model``: the model that generates
        when it is not :attr:`model` -- your own that carries this run's adapter (checked by the adapter weights'
        hash); its adapter is switched off for the pre-trained pass, and no second copy is needed.

        Give the prompts' ``attention_mask`` (left-padded batches); make a new one per call."""
        steering = self.model if model is None else model_with_adapter(model, self.model, "logits_processor")
        return SteeringLogitsProcessor(steering, self.config.method(method, self.gamma), attention_mask=attention_mask,
                                       pad_token_id=self.tokenizer.pad_token_id)

    @property
    def custom_generate(self):
        """A callable for ``model.generate(..., custom_generate=...)`` on :attr:`model`, or on your own model
        that carries this run's adapter (e.g. ``PeftModel.from_pretrained(base, RUN/adapter)``; checked by
        the adapter weights' hash): generate's own decoding loop (greedy, sampling, beam search) with SVDecode's
        processor in it. Every generate option applies on top of the steered distribution."""
        return steering_decoding_loop(self.model, self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, prompt: str | Sequence[str], choices: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 8):
        """Summed log-likelihood of each choice after its prompt: ``{"plain", "base", "steered"}`` (and
        ``"contrastive"`` when the model has a γ).

        One question: ``score(prompt, [c1, c2, ...])`` returns a dict of lists. Many: ``score([p1, p2],
        [[c11, c12], [c21, ...]])`` returns a list of such dicts, scored ``batch_size`` questions at a time.
        Choices are continuations: include their leading space (``" Paris."``), as lm-eval does.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else _sequence(prompt, "prompt", "a string or a list of strings")
        if single:
            choice_lists = [_sequence(choices, "choices", 'a list of strings (e.g. [" Yes.", " No."])')]
        else:
            outer = _sequence(choices, "choices", "a list with one list of strings per prompt")
            choice_lists = [_sequence(c, f"choices[{i}]", "a list of strings") for i, c in enumerate(outer)]
        if len(prompts) != len(choice_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(choice_lists)} choice lists")
        check_prompts(prompts, self.tokenizer)  # a prompt of no tokens leaves no position to predict a choice's first
        for i, (p, cs) in enumerate(zip(prompts, choice_lists)):
            if not cs or not all(isinstance(c, str) and c for c in cs):
                raise ValueError(f"question {i}: choices must be a non-empty list of non-empty strings, got {cs!r}")
        tok = Tokenized(self.tokenizer, self.max_length)
        examples = [ChoiceExample(p, cs, [False] * len(cs), i) for i, (p, cs) in enumerate(zip(prompts, choice_lists))]
        results = []
        for start in range(0, len(examples), batch_size):
            batch = collate_choices(examples[start : start + batch_size], tok)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores = score_choices(self.model, batch, self.config, gamma=self.gamma, forward_mode=self.forward_mode,
                                   prefixes=self.prefixes)
            keys = [k for k in ("plain", "base", "steered", "contrastive") if k in scores]
            for q in batch["question_index"].unique(sorted=True).tolist():
                rows = batch["question_index"] == q
                results.append({k: scores[k][rows].tolist() for k in keys})
        return results[0] if single else results

    def generate(self, prompts: str | Sequence[str], mode: str = "greedy", *, method: Method = "svdecode",
                 with_plain: bool = False, batch_size: int = 8, seed: int = 0, **generation_kwargs):
        """Steered continuations of ``prompts`` (``mode``: greedy, sample or beam; ``method``: svdecode,
        or contrastive with the run's γ).

        ``with_plain=True`` returns dicts ``{prompt, plain, steered, mu, mode}`` with the warm model's
        answer under the same decoding settings. ``max_new_tokens``, ``num_beams``, ``temperature``,
        ``top_k``, ``top_p`` are checked against ``mode``; every other keyword (``repetition_penalty``,
        ``eos_token_id``, ``no_repeat_ngram_size``, ``streamer`` = a ``TextIteratorStreamer`` …) goes
        to transformers' ``generate``, which checks it. A streamer streams the steered answer of one prompt.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        single = isinstance(prompts, str)  # generation.check_prompts checks the rest
        options = {k: generation_kwargs.pop(k) for k in _MODE_OPTIONS if k in generation_kwargs}
        rows = generate_answers(self.model, self.tokenizer, [prompts] if single else prompts,
                                self.config.method(method, self.gamma), mode, batch_size=batch_size, seed=seed,
                                progress=False, with_plain=with_plain, generation=generation_kwargs,
                                forward_mode=self.forward_mode, **options)
        out = rows if with_plain else [r["steered"] for r in rows]
        return out[0] if single else out


def _sequence(value, name: str, expected: str) -> list:
    """``value`` as a list, refusing a lone string (which would be split into characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}")
    return list(value)
