"""Multiple-choice metrics computed from a *score table*.

A score table has one row per (question, choice) with the keys of :mod:`svd_lightning.batch`
(``question_index``, ``choice_set``, ``choice_index``, ``is_true``, ``num_chars``) plus ``score``,
the summed log-likelihood of the choice's continuation given the prompt.

Conventions shared by every metric here:

* **Ties** in an argmax go to the *first* choice by ``choice_index``. This is what lm-eval does
  (``np.argmax`` over the choices in dataset order; for TruthfulQA MC1 the gold answer is first,
  so a tie counts as correct).
* **Duplicate rows** (same question, set and choice) are dropped, keeping the first occurrence:
  DDP's ``DistributedSampler`` repeats samples to give every rank the same number of rows.
* Every metric is an average over questions, in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from svd_lightning.config import VARIANT_LABELS
from svd_lightning.steering import choice_set_nll

TABLE_KEYS = ("question_index", "choice_set", "choice_index", "is_true", "score", "num_chars")


def _prepare(question_index, choice_set, choice_index, is_true, score, num_chars=None) -> dict[str, Tensor]:
    """Deduplicated table on CPU (float64 scores), sorted by (question, set, choice)."""
    n = score.numel()
    if num_chars is None:
        num_chars = torch.ones(n, dtype=torch.long, device="cpu")
    # .long()/.bool(): after a DDP sync an empty rank may have contributed float states.
    t = {
        "question_index": question_index.detach().cpu().long().reshape(-1),
        "choice_set": choice_set.detach().cpu().long().reshape(-1),
        "choice_index": choice_index.detach().cpu().long().reshape(-1),
        "is_true": is_true.detach().cpu().bool().reshape(-1),
        "score": score.detach().to("cpu", torch.float64).reshape(-1),
        "num_chars": num_chars.detach().cpu().long().reshape(-1),
    }
    if any(v.numel() != n for v in t.values()):
        raise ValueError(f"score table columns differ in length: { {k: v.numel() for k, v in t.items()} }")
    if n == 0:
        raise ValueError("the score table is empty")
    if torch.isnan(t["score"]).any():
        raise ValueError("the score table contains NaN scores")
    # Lexicographic sort by (question, set, choice) as three stable sorts, least significant key
    # first; stability keeps duplicates in their original order, so the first occurrence survives.
    order = torch.arange(n, device="cpu")
    for key in ("choice_index", "choice_set", "question_index"):
        order = order[torch.sort(t[key][order], stable=True).indices]
    t = {k: v[order] for k, v in t.items()}
    keys = torch.stack([t["question_index"], t["choice_set"], t["choice_index"]], 1)
    first = torch.ones(n, dtype=torch.bool, device="cpu")
    first[1:] = (keys[1:] != keys[:-1]).any(1)
    return {k: v[first] for k, v in t.items()}


def _select_set(t: dict[str, Tensor], choice_set: int) -> tuple[dict[str, Tensor], Tensor]:
    """Rows of one choice set and a group id per row (0..Q-1, one per question)."""
    rows = {k: v[t["choice_set"] == choice_set] for k, v in t.items()}
    if rows["score"].numel() == 0:
        raise ValueError(f"the score table has no rows with choice_set == {choice_set}")
    questions, group = torch.unique(rows["question_index"], return_inverse=True)
    n_true = torch.zeros(len(questions), dtype=torch.long, device=group.device).index_add_(0, group, rows["is_true"].long())
    if (n_true == 0).any():
        raise ValueError(f"questions {questions[n_true == 0].tolist()} have no true choice in choice_set {choice_set}")
    return rows, group


def _argmax_is_true(rows: dict[str, Tensor], group: Tensor, value: Tensor) -> Tensor:
    """Per question: is the argmax of ``value`` a true choice (ties -> first by choice_index)?"""
    q = int(group.max()) + 1
    best = torch.full((q,), -torch.inf, dtype=value.dtype, device=value.device).scatter_reduce(0, group, value, "amax")
    at_max = value == best[group]
    big = torch.iinfo(torch.long).max
    idx = torch.where(at_max, rows["choice_index"], big)
    first = torch.full((q,), big, device=idx.device).scatter_reduce(0, group, idx, "amin")
    winner = at_max & (rows["choice_index"] == first[group])  # exactly one row per question
    return torch.zeros(q, dtype=torch.bool, device=group.device).index_put_((group[winner],), rows["is_true"][winner])


def _true_mass(rows: dict[str, Tensor], group: Tensor) -> Tensor:
    """Per question: sum over true choices of exp(score), normalised over all choices of the set."""
    q = int(group.max()) + 1
    s = rows["score"]
    # Shift by the per-question max (log-sum-exp trick): the best choice gets weight 1, so the
    # denominator is >= 1 even for scores like -1000, where a plain exp() underflows to 0/0.
    best = torch.full((q,), -torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(0, group, s, "amax")
    w = torch.exp(s - best[group])
    total = torch.zeros(q, dtype=s.dtype, device=s.device).index_add_(0, group, w)
    true = torch.zeros(q, dtype=s.dtype, device=s.device).index_add_(0, group, w * rows["is_true"])
    return true / total


def truthfulqa_per_question(question_index, choice_set, choice_index, is_true, score, num_chars=None) -> dict[str, Tensor]:
    """TruthfulQA metrics per question (sorted by question id); set 0 holds MC1 choices, set 1 MC2's.

    * ``mc1``: argmax of score over set 0 is the true answer (lm-eval / TruthfulQA authors).
    * ``mc2``: ``sum_true exp(score) / sum_all exp(score)`` over set 1 (lm-eval / authors).
    * ``mc2_paper``: the SVD paper's "MC2": argmax of score over *all* of set 1 is a true choice.
    * ``mc3_paper``: the SVD paper's "MC3": normalised true mass on set 1 (the same number as ``mc2``).
    * ``mc_avg_paper``: mean of ``mc1``, ``mc2_paper`` and ``mc3_paper`` (the paper's average).

    ``num_chars`` is accepted (and ignored) so that ``truthfulqa_per_question(**table)`` works.
    """
    t = _prepare(question_index, choice_set, choice_index, is_true, score, num_chars)
    rows0, g0 = _select_set(t, 0)
    rows1, g1 = _select_set(t, 1)
    # Both sets must cover the same questions, otherwise mc_avg_paper mixes different populations.
    q0, q1 = set(rows0["question_index"].tolist()), set(rows1["question_index"].tolist())
    if q0 != q1:
        raise ValueError(f"questions {sorted(q0 ^ q1)} lack choice_set 0 or 1")
    mc1 = _argmax_is_true(rows0, g0, rows0["score"]).double()
    mc2_paper = _argmax_is_true(rows1, g1, rows1["score"]).double()
    mc2 = _true_mass(rows1, g1)
    return {"mc1": mc1, "mc2": mc2, "mc2_paper": mc2_paper, "mc3_paper": mc2, "mc_avg_paper": (mc1 + mc2_paper + mc2) / 3}


def truthfulqa_scores(question_index, choice_set, choice_index, is_true, score, num_chars=None) -> dict[str, float]:
    """Question averages of :func:`truthfulqa_per_question`."""
    per_q = truthfulqa_per_question(question_index, choice_set, choice_index, is_true, score, num_chars)
    return {k: v.mean().item() for k, v in per_q.items()}


def choice_accuracy_per_question(question_index, choice_set, choice_index, is_true, score, num_chars) -> dict[str, Tensor]:
    """lm-eval style accuracy over the ``choice_set == 0`` rows, per question (sorted by id).

    * ``acc``: the argmax of score is a true choice.
    * ``acc_norm``: the argmax of ``score / num_chars`` is a true choice (length-normalised).
    """
    t = _prepare(question_index, choice_set, choice_index, is_true, score, num_chars)
    rows, group = _select_set(t, 0)
    if (rows["num_chars"] <= 0).any():
        raise ValueError("num_chars must be positive for acc_norm")
    return {
        "acc": _argmax_is_true(rows, group, rows["score"]).double(),
        "acc_norm": _argmax_is_true(rows, group, rows["score"] / rows["num_chars"]).double(),
    }


def choice_accuracy(question_index, choice_set, choice_index, is_true, score, num_chars) -> dict[str, float]:
    """Question averages of :func:`choice_accuracy_per_question`."""
    per_q = choice_accuracy_per_question(question_index, choice_set, choice_index, is_true, score, num_chars)
    return {k: v.mean().item() for k, v in per_q.items()}


MetricFamily = Literal["truthfulqa", "choice"]
METRIC_FAMILIES = ("truthfulqa", "choice")
# The two numbers a reader expects of each family, primary first (tables, CIs, the grid).
def choice_nll_per_question(question_index, choice_set, is_true, score, **_) -> Tensor:
    """The multiple-choice loss per question (sorted by question id): ``−log Σ_true softmax(score)``
    of each choice set, summed over the question's sets -- what the ``choice_nll`` strength minimises
    (:func:`svd_lightning.steering.choice_set_nll`). A set without a true choice carries no loss."""
    group_ids, group = torch.unique(torch.stack([question_index, choice_set]), dim=1, return_inverse=True)
    nll = choice_set_nll(score.double(), group, is_true.bool(), group_ids.shape[1])
    nll = torch.where(torch.isfinite(nll), nll, torch.zeros_like(nll))
    questions, per_q = torch.unique(group_ids[0], return_inverse=True)
    return torch.zeros(len(questions), dtype=torch.float64, device=nll.device).index_add(0, per_q, nll)


HEADLINE_METRICS = {"truthfulqa": ("mc2", "mc1"), "choice": ("acc", "acc_norm")}


class MultipleChoiceScores(Metric):
    """Accumulates the score table over batches (and DDP ranks) and computes multiple-choice metrics.

    ``family="truthfulqa"`` uses :func:`truthfulqa_scores`, ``family="choice"`` :func:`choice_accuracy`;
    a task's DataModule declares which (its ``metric`` attribute).
    ``compute()`` returns a dict of scalar tensors; ``table()`` the deduplicated, synced score table.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, family: MetricFamily = "truthfulqa", **kwargs) -> None:
        super().__init__(**kwargs)
        if family not in METRIC_FAMILIES:
            raise ValueError(f"metric family must be one of {METRIC_FAMILIES}, got {family!r}")
        self.family = family
        for key in TABLE_KEYS:  # list states + "cat": every rank's rows are gathered, not averaged
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, batch_meta, score: Tensor) -> None:
        """Add rows: ``batch_meta`` holds the five batch keys, ``score`` the [N] log-likelihoods."""
        score = score.detach().reshape(-1)  # keeps its dtype; the pure functions upcast to float64
        cols = {k: score if k == "score" else torch.as_tensor(batch_meta[k], device=score.device).reshape(-1) for k in TABLE_KEYS}
        for key, value in cols.items():  # check every column before appending any (no half-updates)
            if value.numel() != score.numel():
                raise ValueError(f"batch_meta[{key!r}] has {value.numel()} rows but score has {score.numel()}")
        for key, value in cols.items():
            getattr(self, key).append(value.to(self.device))

    def _table(self) -> dict[str, Tensor]:
        if isinstance(self.score, list) and not self.score:
            raise ValueError("MultipleChoiceScores has no rows: call update() first")
        return _prepare(**{key: dim_zero_cat(getattr(self, key)) for key in TABLE_KEYS})

    def compute(self) -> dict[str, Tensor]:
        fn = truthfulqa_scores if self.family == "truthfulqa" else choice_accuracy
        return {k: torch.tensor(v, device=self.device) for k, v in fn(**self._table()).items()}

    def per_question(self) -> dict[str, Tensor]:
        """Metric -> per-question values (sorted by question id), over all ranks; ``question`` holds the ids."""
        table = self.table()
        fn = truthfulqa_per_question if self.family == "truthfulqa" else choice_accuracy_per_question
        return {"question": torch.unique(table["question_index"]), **fn(**table)}

    def table(self) -> dict[str, Tensor]:
        """Deduplicated score table over all ranks (CPU, sorted by question, set, choice)."""
        if self._is_synced:  # already inside compute()'s sync
            return self._table()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._table()


def variant_table(results: dict, stage: str) -> dict[str, dict[str, float]]:
    """``{variant: {metric: value}}`` of one stage's logged results (keys ``"<stage>/<metric>_<variant>"``):
    the variants that were scored, in :data:`~svd_lightning.config.VARIANT_LABELS` order, metrics sorted."""
    table: dict[str, dict[str, float]] = {}
    for key in results:
        if key.startswith(f"{stage}/"):
            metric, _, variant = key[len(stage) + 1 :].rpartition("_")
            if variant in VARIANT_LABELS and metric:
                table.setdefault(variant, {})[metric] = results[key]
    return {v: dict(sorted(table[v].items())) for v in VARIANT_LABELS if v in table}

