"""A finished run in your own code: score choices and generate with SVDecode, no Trainer.

    from svd_lightning import SteeredModel

    sm = SteeredModel.from_run_dir("runs/truthfulqa-lora/version_0")
    sm.score("Q: What is the capital of France?\\nA:", [" Paris.", " Lyon."])
    # {'plain': [...], 'base': [...], 'steered': [...]}   summed log-likelihood of each choice
    sm.generate(["Q: What happens if you crack your knuckles a lot?\\nA:"], max_new_tokens=32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.config import ConfigError, Method, SteeringConfig
from svd_lightning.decoding import MODES, generate_answers, score_choices
from svd_lightning.run import load_run


@dataclass
class SteeredModel:
    """A peft model, its tokenizer and the :class:`~svd_lightning.config.SteeringConfig` of a run.

    Build one with :meth:`from_run_dir`, or from a peft model you hold
    (``SteeredModel(module.model, module.tokenizer, module.steering_config)``). ``config.mu`` must be
    set (a run always has it); ``config.gamma`` (the contrastive baseline's γ, when the run fit one)
    adds a ``contrastive`` score and ``generate(..., method="contrastive")``.
    """

    model: torch.nn.Module
    tokenizer: object
    config: SteeringConfig
    max_length: int = 512
    run_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, SteeringConfig):
            raise TypeError(f"config must be a SteeringConfig, got {type(self.config).__name__}")
        if self.config.mu is None:
            raise ConfigError(f"SteeredModel{f' (run {self.run_dir})' if self.run_dir else ''}: config.mu is None; "
                              "a steered model needs a strength")
        self.model.eval()

    @classmethod
    def from_run_dir(cls, path: str | os.PathLike, *, device: str | torch.device | None = None, **overrides) -> "SteeredModel":
        """Load ``path``'s base model + adapter + settings; ``overrides`` replace settings (e.g. ``mu=0.0``,
        ``forward_mode="two_pass"``), checked by :meth:`SteeringConfig.replace`."""
        model, tokenizer, run = load_run(path)
        config = run.steering.replace(**overrides)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, config, run_dir=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, prompt: str | Sequence[str], choices: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 8):
        """Summed log-likelihood of each choice after its prompt: ``{"plain", "base", "steered"}`` (and
        ``"contrastive"`` when the config has a γ).

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
        for i, (p, cs) in enumerate(zip(prompts, choice_lists)):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
            if not cs or not all(isinstance(c, str) and c for c in cs):
                raise ValueError(f"question {i}: choices must be a non-empty list of non-empty strings, got {cs!r}")
        tok = Tokenized(self.tokenizer, self.max_length)
        examples = [ChoiceExample(p, cs, [False] * len(cs), i) for i, (p, cs) in enumerate(zip(prompts, choice_lists))]
        results = []
        for start in range(0, len(examples), batch_size):
            batch = collate_choices(examples[start : start + batch_size], tok)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores = score_choices(self.model, batch, self.config)
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
        answer under the same decoding settings. Keyword options: ``max_new_tokens``, ``num_beams``,
        ``temperature``, ``top_k``, ``top_p``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        single = isinstance(prompts, str)  # decoding.check_prompts checks the rest
        rows = generate_answers(self.model, self.tokenizer, [prompts] if single else prompts,
                                self.config.method(method), mode, batch_size=batch_size, seed=seed, progress=False,
                                with_plain=with_plain, **generation_kwargs)
        out = rows if with_plain else [r["steered"] for r in rows]
        return out[0] if single else out


def _sequence(value, name: str, expected: str) -> list:
    """``value`` as a list, refusing a lone string (which would be split into characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}")
    return list(value)
