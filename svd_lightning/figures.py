"""The small figures every run carries (PNG), referenced from its model card.

* ``<stage>_questions.png`` (``fit``'s validation, ``validate``, ``test``): each question's score under
  SVDecode against the warm start's -- TruthfulQA's MC2 (the probability mass on the true answers), or
  for accuracy tasks how many questions steering turned right and wrong;
* ``calibration.png``: the calibration loss the strength solve sees, as a function of μ, with μ̄ marked
  (the token NLL ``exact`` minimises; the multiple-choice loss too when ``choice_nll`` was solved).

Drawn with matplotlib's object API on an Agg canvas (imported only when a figure is drawn): no pyplot, so
a user's backend and open figures (a notebook's inline plots) are left as they are.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

CALIBRATION_FIGURE = "calibration.png"


def questions_figure_name(stage: str) -> str:
    return f"{stage}_questions.png"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float = 4.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def questions_figure(per_question: dict[str, dict[str, list]], family: str, stage: str, mu: float | None) -> bytes | None:
    """Steered against warm-start score per question (``per_question``: variant -> metric -> values, as
    :class:`~svd_lightning.metrics.MultipleChoiceScores` gives them); None when either was not scored."""
    if "steered" not in per_question or "plain" not in per_question:
        return None
    fig, ax = _figure()
    title = f"{stage} split, {len(per_question['plain'].get('question', []))} questions" + (
        "" if mu is None else f", μ̄ = {mu:+.4g}")
    if family == "truthfulqa":
        warm, steered = per_question["plain"]["mc2"], per_question["steered"]["mc2"]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, zorder=0)
        ax.scatter(warm, steered, s=14, alpha=0.7)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="MC2, warm start", ylabel="MC2, +SVDecode", title=title)
        better = sum(s > w for s, w in zip(steered, warm))
        ax.text(0.02, 0.97, f"above the diagonal: {better} of {len(warm)}", transform=ax.transAxes, va="top", fontsize=8)
    else:
        metric = "acc_norm" if "acc_norm" in per_question["plain"] else "acc"
        warm, steered = per_question["plain"][metric], per_question["steered"][metric]
        kinds = {"right → right": (1, 1), "wrong → right": (0, 1), "right → wrong": (1, 0), "wrong → wrong": (0, 0)}
        counts = [sum(round(w) == a and round(s) == b for w, s in zip(warm, steered)) for a, b in kinds.values()]
        ax.bar(list(kinds), counts, color=["0.6", "tab:green", "tab:red", "0.8"])
        ax.set(ylabel="questions", title=f"{metric}, warm start → +SVDecode\n{title}")
        ax.tick_params(axis="x", labelsize=8)
    return _png(fig)


def calibration_figure(mus: Sequence[float], token_nll: Sequence[float], mu: float, strength: str,
                       choice_loss: Sequence[float] | None = None) -> bytes:
    """The calibration loss along μ (``token_nll``: mean NLL per reference-answer token; ``choice_loss``:
    the multiple-choice loss per question), the solved ``mu`` marked."""
    fig, ax = _figure()
    ax.plot(mus, token_nll, color="tab:blue", label="token NLL (exact's objective)")
    ax.axvline(mu, color="tab:red", lw=1, label=f"μ̄ = {mu:+.4g} ({strength})")
    ax.axvline(0.0, color="0.7", lw=1, ls=":", label="μ = 0: the warm start")
    ax.set(xlabel="μ", ylabel="mean NLL per calibration token", title="The strength solve on the calibration set")
    if choice_loss is not None:
        other = ax.twinx()
        other.plot(mus, choice_loss, color="tab:orange", label="multiple-choice loss (choice_nll's)")
        other.set_ylabel("multiple-choice loss per question")
        other.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    return _png(fig)


def strength_grid(mu: float, *others: float, points: int = 41) -> list[float]:
    """μ values around 0 and the solved strengths, wide enough to show the curve's shape on both sides."""
    lo, hi = min(0.0, mu, *others), max(0.0, mu, *others)
    pad = max(hi - lo, abs(mu), 1e-3) * 0.5
    lo, hi = lo - pad, hi + pad
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]
