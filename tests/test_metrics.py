import math

import pytest
import torch

from svd_lightning.metrics import MultipleChoiceScores, choice_accuracy, choice_nll_per_question, truthfulqa_scores

KEYS = ("question_index", "choice_set", "choice_index", "is_true", "score", "num_chars")


def table(rows):
    """rows: (question, set, choice, is_true, score, num_chars) tuples -> dict of tensors."""
    q, s, c, t, sc, n = zip(*rows)
    return {
        "question_index": torch.tensor(q),
        "choice_set": torch.tensor(s),
        "choice_index": torch.tensor(c),
        "is_true": torch.tensor(t),
        "score": torch.tensor(sc, dtype=torch.float64),
        "num_chars": torch.tensor(n),
    }


# TruthfulQA: three questions with non-consecutive ids.
TQA_ROWS = [
    # q5: the true answer wins in both sets.
    (5, 0, 0, True, -1.0, 3), (5, 0, 1, False, -2.0, 3), (5, 0, 2, False, -3.0, 3),
    (5, 1, 0, True, -1.0, 3), (5, 1, 1, True, -2.0, 3), (5, 1, 2, False, -1.5, 3),
    # q7: a false choice wins in both sets.
    (7, 0, 0, True, -2.0, 3), (7, 0, 1, False, -1.0, 3),
    (7, 1, 0, True, -3.0, 3), (7, 1, 1, False, -1.0, 3),
    # q9: ties; set 0 -> first choice (true) wins; set 1 -> first choice (false) wins; huge negative scores.
    (9, 0, 0, True, -1.0, 3), (9, 0, 1, False, -1.0, 3),
    (9, 1, 0, False, -1000.0, 3), (9, 1, 1, True, -1000.0, 3), (9, 1, 2, True, -1001.0, 3),
]
E = math.exp
MASS = [
    (E(-1) + E(-2)) / (E(-1) + E(-2) + E(-1.5)),
    E(-3) / (E(-3) + E(-1)),
    (1 + E(-1)) / (2 + E(-1)),  # -1000/-1001 shifted by the max
]
TQA_EXPECTED = {
    "mc1": 2 / 3,
    "mc2": sum(MASS) / 3,
    "mc2_paper": 1 / 3,
    "mc3_paper": sum(MASS) / 3,
    "mc_avg_paper": (2 / 3 + 1 / 3 + sum(MASS) / 3) / 3,
}

# Choice accuracy: (question, set, choice, is_true, score, num_chars).
CHOICE_ROWS = [
    (0, 0, 0, True, -4.0, 2), (0, 0, 1, False, -3.0, 1),  # acc: false wins; norm: -2 > -3, true wins
    (1, 0, 0, False, -2.0, 4), (1, 0, 1, True, -2.0, 2),  # acc: tie -> first (false); norm: -0.5 > -1, false
    (2, 0, 0, False, -6.0, 3), (2, 0, 1, True, -2.0, 1),  # acc: true wins; norm: tie -2 == -2 -> first (false)
    (3, 0, 0, True, -1.0, 10), (3, 0, 1, False, -5.0, 10),  # both: true wins
    (3, 1, 0, False, 0.0, 1), (3, 1, 1, True, -9.0, 1),  # set 1 is ignored by choice_accuracy
]
CHOICE_EXPECTED = {"acc": 2 / 4, "acc_norm": 2 / 4}


def assert_close(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        assert float(got[k]) == pytest.approx(expected[k], abs=1e-6), k


def test_truthfulqa_hand_computed():
    assert_close(truthfulqa_scores(**table(TQA_ROWS)), TQA_EXPECTED)


def test_truthfulqa_row_order_and_num_chars_irrelevant():
    rows = TQA_ROWS[::-1]
    t = table(rows)
    del t["num_chars"]
    assert_close(truthfulqa_scores(**t), TQA_EXPECTED)


def test_mc2_stable_for_very_negative_scores():
    rows = [(0, 0, 0, True, -1000.0, 1), (0, 1, 0, True, -1000.0, 1), (0, 1, 1, False, -1001.0, 1)]
    out = truthfulqa_scores(**table(rows))
    assert out["mc2"] == pytest.approx(1 / (1 + E(-1)))
    assert out["mc3_paper"] == out["mc2"]
    assert out["mc1"] == out["mc2_paper"] == 1.0


def test_choice_accuracy_hand_computed():
    assert_close(choice_accuracy(**table(CHOICE_ROWS)), CHOICE_EXPECTED)


def test_tie_goes_to_first_choice_index_not_row_order():
    # Rows arrive with choice 1 first; the tie must still go to choice_index 0 (false).
    rows = [(0, 0, 1, True, -1.0, 1), (0, 0, 0, False, -1.0, 1)]
    assert choice_accuracy(**table(rows))["acc"] == 0.0


def test_duplicates_keep_first_occurrence():
    # A padded DDP repeat of q7's set-0 false choice with a different score: ignored when it comes later.
    dup = (7, 0, 1, False, -5.0, 3)
    assert_close(truthfulqa_scores(**table(TQA_ROWS + [dup, dup])), TQA_EXPECTED)
    # When it comes first it is the kept one: q7's true answer now wins mc1.
    out = truthfulqa_scores(**table([dup] + TQA_ROWS))
    assert out["mc1"] == pytest.approx(1.0)
    assert_close(choice_accuracy(**table(CHOICE_ROWS + CHOICE_ROWS[:3])), CHOICE_EXPECTED)


def test_question_without_true_choice_raises():
    rows = [r for r in TQA_ROWS if not (r[0] == 7 and r[1] == 1 and r[3])]  # q7 set 1: no true choice
    with pytest.raises(ValueError, match=r"\[7\].*choice_set 1"):
        truthfulqa_scores(**table(rows))
    with pytest.raises(ValueError, match=r"\[1\]"):
        choice_accuracy(**table([(0, 0, 0, True, -1.0, 1), (1, 0, 0, False, -1.0, 1)]))


def test_missing_choice_set_raises():
    rows = [r for r in TQA_ROWS if not (r[0] == 9 and r[1] == 1)]
    with pytest.raises(ValueError, match=r"\[9\]"):
        truthfulqa_scores(**table(rows))


def split_update(metric, rows, parts):
    t = table(rows)
    for idx in parts:
        idx = torch.as_tensor(idx)
        metric.update({k: t[k][idx] for k in KEYS if k != "score"}, t["score"][idx])


@pytest.mark.parametrize(
    "task,rows,fn", [("truthfulqa", TQA_ROWS, truthfulqa_scores), ("choice", CHOICE_ROWS, choice_accuracy)]
)
def test_metric_matches_pure_function(task, rows, fn):
    expected = fn(**table(rows))
    n = len(rows)
    m = MultipleChoiceScores(family=task)
    split_update(m, rows, [range(0, n // 2), range(n // 2, n)])
    out = m.compute()
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.values())
    assert_close(out, expected)

    # Shuffled rows split across two updates, with a duplicated row: same result.
    m.reset()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    split_update(m, rows, [perm[:5], perm[5:] + perm[:1]])
    assert_close(m.compute(), expected)


def test_metric_table_and_reset():
    m = MultipleChoiceScores(family="truthfulqa")
    t = table(TQA_ROWS)
    m.update({k: t[k] for k in KEYS if k != "score"}, t["score"].float())
    m.update({k: t[k][:2] for k in KEYS if k != "score"}, t["score"][:2].float())  # repeats
    tab = m.table()
    assert set(tab) == set(KEYS) and len(tab["score"]) == len(TQA_ROWS)
    assert tab["score"].dtype == torch.float64
    assert tab["question_index"].tolist() == sorted(tab["question_index"].tolist())
    assert_close(truthfulqa_scores(**tab), TQA_EXPECTED)

    m.reset()
    with pytest.raises(ValueError, match="no rows"):
        m.table()
    m.update({k: t[k][:1] for k in KEYS if k != "score"}, t["score"][:1])
    assert len(m.table()["score"]) == 1


def test_metric_validates_inputs():
    with pytest.raises(ValueError, match="metric family"):
        MultipleChoiceScores(family="mmlu")
    m = MultipleChoiceScores(family="choice")
    t = table(CHOICE_ROWS)
    with pytest.raises(ValueError, match="rows"):
        m.update({k: t[k] for k in KEYS if k != "score"}, t["score"][:3])
    assert m.question_index == [] and m.score == []  # a rejected batch leaves no partial state


def test_choice_nll_per_question_by_hand():
    # question 7: set 0 (one true of 3), set 1 (two true of 3); question 2: one set, 2 choices
    table = {"question_index": torch.tensor([7, 7, 7, 7, 7, 7, 2, 2]),
             "choice_set": torch.tensor([0, 0, 0, 1, 1, 1, 0, 0]),
             "is_true": torch.tensor([1, 0, 0, 1, 1, 0, 0, 1], dtype=torch.bool)}
    score = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0, -2.0, -4.0, -4.5], dtype=torch.float64)
    lse = lambda x: float(torch.logsumexp(torch.tensor(x, dtype=torch.float64), 0))  # noqa: E731
    q7 = (lse([-1.0, -2.0, -0.5]) - (-1.0)) + (lse([-3.0, -1.0, -2.0]) - lse([-3.0, -1.0]))
    q2 = lse([-4.0, -4.5]) - (-4.5)
    got = choice_nll_per_question(**table, score=score)  # sorted by question id: 2, then 7
    torch.testing.assert_close(got, torch.tensor([q2, q7], dtype=torch.float64), atol=1e-12, rtol=0)
