"""A run's model card: the ``README.md`` that says what a run is, on the Hugging Face Hub and on disk.

Every finished run carries one (:class:`svd_lightning.run.RunWriter` writes it when the run is
committed), so a run directory uploads to the Hub as it is. Everything on the card is read from
the run: ``steering.json`` (base model, adapter, μ̄, γ and how they were calibrated) and, where
the command scored a split, ``metrics.json`` (the headline numbers and their paired bootstrap CIs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from svd_lightning.config import VARIANT_LABELS as _VARIANTS
from svd_lightning.metrics import variant_table

CARD_FILE = "README.md"


def _base_model(model: str) -> str | None:
    """The Hub id of the run's base model, where the source names one (our aliases: the model they stand for)."""
    from svd_lightning.models import portable_base

    name = portable_base(model)[0]
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf")
    return name if looks_like_id else None


def base_license(model: str) -> str | None:
    """The base model's license as its own model card states it, read where the card is on this machine (a
    local model folder's README.md, or the Hub cache; nothing is fetched); None where it is not."""
    from pathlib import Path

    from huggingface_hub import ModelCard, try_to_load_from_cache

    from svd_lightning.models import SMOLLM2_HUB_ID, SMOLLM2_LICENSE, portable_base

    name = portable_base(model)[0]
    if name == SMOLLM2_HUB_ID:
        return SMOLLM2_LICENSE
    card = Path(model).expanduser() / "README.md"
    if not card.is_file():
        try:
            cached = try_to_load_from_cache(name, "README.md")
        except ValueError:  # not a repo id
            cached = None
        card = Path(cached) if isinstance(cached, str) else None
    if card is None:
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # an unreadable card: no license stated
        return None


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _last_scored(metrics: dict | None) -> dict | None:
    """The last entry of ``metrics.json``'s history that scored a split (None: none did)."""
    history = (metrics or {}).get("history") or []
    scored = [h for h in history if any(k.startswith(f"{h.get('stage')}/") for k in h)]
    return scored[-1] if scored else None


def _results(metrics: dict | None) -> list[str]:
    """The last scored split of ``metrics.json``: a table per variant and the paired gains with CIs."""
    last = _last_scored(metrics)
    if last is None:
        return ["No split was scored by the command that wrote this run."]
    table = variant_table(last, last["stage"])
    names = sorted({n for values in table.values() for n in values})
    lines = [f"Scored on the **{last['stage']}** split after warm-start step {last.get('step')} (percent):", "",
             "| metric | " + " | ".join(_VARIANTS[v] for v in table) + " |", "|---|" + "---:|" * len(table)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{100 * values[n]:.2f}" if n in values else "" for values in table.values())
                     + " |")
    gains = last.get("paired_bootstrap") or {}
    if gains:
        lines += ["", "Paired differences, 95 % paired bootstrap over the split's questions (one run, one seed: "
                  "a CI over questions, not over warm starts):", "",
                  "| metric | method − reference | difference | 95 % CI | questions |", "|---|---|---:|---|---:|"]
        for g in gains.values():
            lines.append(f"| {g['metric']} | {_VARIANTS.get(g['method'], g['method'])} − "
                         f"{_VARIANTS.get(g['reference'], g['reference'])} | {100 * g['mean']:+.2f} | "
                         f"[{100 * g['ci_low']:+.2f}, {100 * g['ci_high']:+.2f}] | {g['questions']} |")
    return lines


def card_data(run, metrics: dict | None, base: str | None):
    """The card's metadata, as the Hub reads it (``huggingface_hub.ModelCardData``): library, base model, tags
    and, where the command scored a split, its plain and steered headline metrics as eval results."""
    from huggingface_hub import EvalResult, ModelCardData

    last = _last_scored(metrics)
    results = []
    if last is not None:
        stage = last["stage"]
        for name, values in variant_table(last, stage).items():
            if name not in ("plain", "steered"):
                continue
            for metric in ("mc1", "mc2", "acc", "acc_norm"):
                if metric in values:
                    results.append(EvalResult(
                        task_type="multiple-choice", dataset_type=f"svd-lightning/{stage}-split",
                        dataset_name=f"the run's {stage} split", metric_type=metric, metric_value=float(values[metric]),
                        metric_name=f"{metric} ({_VARIANTS.get(name, name)})"))
    return ModelCardData(library_name="peft", base_model=base, license=base_license(run.model),
                         datasets=run.datasets or None, tags=["svd-lightning", "svdecode", "steering", run.adapter],
                         model_name=f"SVDecode {run.adapter} on {run.model}" if results else None,
                         eval_results=results or None)


FIGURE_CAPTIONS = {"calibration.png": "the strength solve: calibration loss along μ, μ̄ marked",
                   "val_questions.png": "validation, per question: +SVDecode against the warm start",
                   "test_questions.png": "test, per question: +SVDecode against the warm start"}


def _figures(figures) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for name in figures:
        lines += [f"![{FIGURE_CAPTIONS.get(name, name)}]({name})", "", f"*{FIGURE_CAPTIONS.get(name, name)}* (`{name}`)", ""]
    return lines


def model_card(run, metrics: dict | None = None, name: str = "path/to/this/run", figures: Sequence[str] = ()) -> str:
    """The card of ``run`` (a :class:`~svd_lightning.run.SteeringRun`), with ``metrics`` (a run's
    ``metrics.json``) when given; ``name`` is what the loading snippet loads (a directory or a repo id);
    ``figures``: the run's PNG files (:mod:`svd_lightning.figures`), shown under the results."""
    s = run.steering
    base = _base_model(run.model)
    front = card_data(run, metrics, base).to_yaml()
    d = run.diagnostics or {}
    h = run.hparams or {}
    solver = run.solver
    strength = solver.strength + (f" ({solver.curvature} curvature" + (f", trim {solver.trim}" if solver.strength ==
                                                                     "trimmed" else "") + ")")
    rows = [
        ("base model", f"`{run.model}`" + (f" ([{base}](https://huggingface.co/{base}))" if base else "")),
        ("adapter", f"{run.adapter}" + (f", options {run.adapter_options}" if run.adapter_options else ", peft defaults "
                                        "of svd-lightning (see `adapter/adapter_config.json`)")),
        ("warm start", f"{run.global_step} steps" + (f", learning rate {h['learning_rate']}" if "learning_rate" in h else "")),
        ("μ̄ (steering strength)", f"{s.mu:.6g}, by `{strength}`"),
        ("α (confidence mask), policy, direction", f"{s.alpha}, `{s.scoring_policy}`, `{s.direction}`"),
        ("γ (contrastive baseline)", "none fit" if run.contrastive_gamma is None else
         f"{run.contrastive_gamma:g}, fit to the calibration multiple-choice loss"),
        ("calibrated on", f"{_num(d.get('tokens'), 6)} reference-answer tokens"
         + (f", {_num(d.get('choice_sets'), 6)} choice sets ({_num(d.get('choice_rows'), 6)} rows)" if "choice_sets" in d else "")
         + f"; mean KL(warm ‖ pre-trained) per token {_num(d.get('kl_mean'))}"),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((run.versions or {}).items()))
    lines = [
        "---", front, "---", "",
        f"# SVDecode run: {run.adapter} on {run.model}",
        "",
        "A warm-started peft adapter and the steering strength solved for it: Steering Vector Decoding (SVDecode, "
        "NeurIPS 2025) moves the adapter's next-token distribution along the KL gradient between it and the "
        "pre-trained model, by μ̄. Written by svd-lightning.",
        "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Results",
        "",
        *_results(metrics),
        "",
        *_figures(figures),
        "## Use",
        "",
        "```python",
        "from svd_lightning import SteeredModel",
        "",
        f'sm = SteeredModel.from_pretrained("{name}")',
        'sm.score("Q: What is the capital of France?\\nA:", [" Paris.", " Lyon."])',
        'sm.generate("Q: What happens if you crack your knuckles a lot?\\nA:", max_new_tokens=32)',
        "```",
        "",
        "In your own `transformers` code, `model.generate(..., custom_generate=sm.custom_generate)` or "
        "`logits_processor=LogitsProcessorList([sm.logits_processor(attention_mask)])` steer the same way.",
        "",
        f"Files: `adapter/` (peft `save_pretrained`), `steering.json` (the run record: settings, every strength "
        f"option's μ on the same calibration, hashes of the adapter and tokenizer). Format {run.format_version}"
        + (f"; {versions}." if versions else "."),
        "",
    ]
    return "\n".join(lines)
