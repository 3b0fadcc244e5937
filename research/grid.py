"""The SVDecode benchmark grid on SmolLM2-135M: adapters x tasks x seeds x warm-start epochs.

One *cell* is (task, adapter, seed). It warm-starts the adapter for ``max(epochs) + 1`` epochs. After
the last one it scores the plain adapter only: the equal-cost "+1 epoch" baseline of epoch ``max(epochs)``
(epoch e + 1 is that baseline for every other epoch e). After each evaluated epoch, all through the
package's own code:

1. the calibration pass (:func:`svd_lightning.calibration.calibrate_pass`, over the calib split's
   choice batches, as ``fit`` runs it): every strength option for every mask threshold α (and
   ``none`` = no mask) and for the logit-difference direction, the ``choice_nll`` caches and the
   contrastive baseline's γ grid;
2. scoring the calib and test choices (:func:`svd_lightning.scoring.score_choice_variants`): plain
   (warm), base (pre-trained), SVDecode for every (strength option, curvature, α, scoring policy),
   a fixed-μ sweep, the paper's mask alone (μ = 0) and the contrastive baseline
   ``z_φ + γ(z_φ − z_θ)`` for a γ grid -- each a :class:`SteeringConfig`, all exact, from one
   forward per batch.

It writes ``results/grid/<task>-<adapter>-seed<k>-epoch<e>.json``: calib means and per-question
calib *and* test values of every variant (so report.py can resample the selection as well as the
test questions), and the file rows of the cell's train/calib/test questions. Cells whose files exist
in the current ``FORMAT`` are skipped, so an interrupted run resumes; older files are rewritten.
``research/report.py`` turns the files into tables/plots.

Seeds are independent replicates: seed k draws the train/calib/test split (where the split is ours:
TruthfulQA, PIQA, HellaSwag; for round 1's ARC and BoolQ the train file's train/calib split, the
test file being fixed), the shuffle order, the adapter init and dropout. An adapter whose init does not depend
on the seed (IA3) is marked ``deterministic_init`` in its cells.

What a task trains and scores is its :class:`Task`. Evidence round 2's tasks (``research/round2.sh``,
reported by ``research/budget.py``) add the equal-cost "+ the calibration's cost" baseline (label
``1+cal``), the wide γ grid, and for the fresh-question demo regime the training-budget curve
(labels ``0.25``, ``0.5``) on calib/test questions no earlier result used (``--make-pool``). The
commonsense "_demo" tasks draw their test questions by seed (``DrawnTestCommonsense``).

The γ grid of ``truthfulqa_fresh_closed`` is *closed*: the wide grid on to |γ| = 10⁴ and its limits
γ = ±∞ (:class:`svd_lightning.steering.ContrastiveLimit`), where the wide grid's edge picks had sat.

Each scored point keeps its adapter (``<out>/.tmp/adapters/<cell>-epoch<label>/``, local), so a grid
extended later re-scores it without training: ``--score-saved``. ``--train-only`` trains and keeps
the adapters without scoring (it leaves training exactly as scoring leaves it), so two workers can
train while scoring waits for a free core.

    python -m research.grid                       # the committed grid (see GRID below)
    python -m research.grid --only truthfulqa-lora --seeds 0
    GRID_THREADS=1 python -m research.grid & GRID_THREADS=1 python -m research.grid   # 2 workers
    python -m research.grid --only truthfulqa_fresh_closed-lora --train-only --out results/grid_closed
    python -m research.grid --only truthfulqa_fresh_closed-lora --score-saved --labels 1 0.5 --out results/grid_closed

Workers share the grid through a lock file per cell (``results/grid/.tmp/<cell>.lock``; per point
when scoring kept adapters).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from svd_lightning import CalibrationNeeds, SteeringConfig, SteeringLM, calibrate_pass
from svd_lightning import files as run_files
from svd_lightning.callbacks.progress import LogProgressBar
from svd_lightning.data import CommonsenseDataModule, TruthfulQADataModule
from svd_lightning.data.base import PAPER_SPLIT, ChoiceDataModule, seeded_split
from svd_lightning.experimental import GAMMA_GRID, CalibrationPass, ContrastiveLimit, PrefixCache, score_choice_variants
from svd_lightning.metrics import (
    HEADLINE_METRICS,
    choice_accuracy_per_question,
    choice_nll_per_question,
    truthfulqa_per_question,
)
from svd_lightning.precision import BF16, describe_cpu, fast_precision
from svd_lightning.progress import stderr_is_terminal, track

ROOT = Path(__file__).resolve().parent
ALPHAS = {"0.05": 0.05, "0.1": 0.1, "0.3": 0.3, "none": None}  # none: δz unmasked (policy `none`)
STRENGTHS = [f"{a}_{c}" for a in ("mean", "median", "trimmed", "pooled") for c in ("identity", "fisher")] + ["exact"]
FIXED_MU = [-5.0, -2.0, -1.0, -0.5, -0.2, -0.1, -0.05, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
# Contrastive z_φ + γ(z_φ − z_θ) on a γ grid: calib selection by accuracy/MC2 ("contrastive γ (calib)")
# and by the calib multiple-choice NLL (its choice_nll strength, fit on this grid, as the framework's
# ContrastiveBaseline fits it).
GAMMAS = list(GAMMA_GRID)
# Policy `none` costs one full-vocabulary log-softmax per μ: only these strength options.
NONE_STRENGTHS = ("exact", "mean_identity", "median_identity", "pooled_identity", "pooled_fisher")
# The logit difference z_φ − z_θ as a steering direction (contrastive decoding / proxy tuning as a peer
# of SVDecode): with the α = 0.1 mask ("ld_a0.1") and without a mask ("ld_none": contrastive at γ = μ),
# each with the exact calib-NLL strength and with the strength fit to the calib multiple-choice loss.
LD_MASKS = {"ld_a0.1": 0.1, "ld_none": None}
FLOOR = -20.0
SETTINGS = SteeringConfig(floor=FLOOR)  # every variant's settings start here
# choice_nll by ChoiceStrengthCache (bracket + golden section) where the mask keeps the cache small;
# unmasked (ld_none) it would hold thousands of tokens per position, so its γ is the best of GAMMAS
# (the pass's "contrastive" grid, as the framework's ContrastiveBaseline fits it).
CHOICE_FITS = {"0.1": SETTINGS.replace(alpha=0.1), "ld_a0.1": SETTINGS.replace(alpha=0.1, direction="logit_difference")}

COMMONSENSE = "../shared/data/commonsense"


def is_truthfulqa(task: str) -> bool:
    return task.startswith("truthfulqa")


def commonsense(test: str, train: str | None = None, root: str = COMMONSENSE):
    """A commonsense task; without a train file, train/calib/test are seeded 60/20/20 splits of the test file.

    The cell's seed is the DataModule's: it draws the split and the shuffle order, so seeds are
    independent replicates of the data as well as of the adapter init.
    """
    return lambda seed: CommonsenseDataModule(
        test_path=f"{root}/{test}", train_path=train and f"{root}/{train}",
        seed=seed, limit_train=200, limit_calib=60, limit_test=150, max_length=256, split=PAPER_SPLIT, val_fraction=0.0,
    )


# -- evidence round 2: the demo regime on fresh questions -------------------------------------------
# Questions no earlier selection or reported test used: every committed TruthfulQA cell's calib and
# test rows (the format-1 split is seed 0's zero-shot split, which those cells include) and the README
# demo's test split. Fresh seeds draw calib and test only from the rest; training may use any other row.
FRESH_POOL = ROOT / "results" / "fresh_pool.json"
DEMO_SPLIT = {"seed": 0, "split": PAPER_SPLIT}  # configs/truthfulqa/lora.yaml: the demo's test split
FRESH_SIZES = {"train": 490, "calib": 50, "test": 80}  # the demo regime's: 490 train, calib / test as its cells
# Wide, log-spaced γ (0 = warm start): the first grid (±5 at most) had its edge picked in 4 of 5 seeds.
WIDE_GAMMAS = (0.0,) + tuple(sign * round(10 ** (k / 4), 4) for k in range(-8, 9) for sign in (-1, 1))
# The wide grid to |γ| = 10⁴, closed by its limits γ = ±∞: its edge picks sat on a plateau toward the limit.
CLOSED_GAMMAS = (0.0,) + tuple(sign * round(10 ** (k / 4), 4) for k in range(-8, 17) for sign in (-1, 1))


def used_rows(grid_dir: Path, data_path: str) -> dict[str, list[int]]:
    """TruthfulQA file rows used to select or to report, by source: every committed cell's calib and
    test rows (cells of truthfulqa tasks) and the demo's test split."""
    used: dict[str, list[int]] = {}
    for path in sorted(grid_dir.glob("truthfulqa*-epoch*.json")):
        cell = json.loads(path.read_text())
        if "split" in cell and not cell.get("fresh"):
            used[path.stem] = sorted(set(cell["split"]["calib"]) | set(cell["split"]["test"]))
    demo = TruthfulQADataModule(path=data_path, **DEMO_SPLIT)
    used["readme_demo_test"] = split_record(demo)["test"]
    return used


def fresh_pool(grid_dir: Path, data_path: str) -> dict:
    """The rows of ``data_path`` outside every used row (:func:`used_rows`), with what was excluded."""
    used = used_rows(grid_dir, data_path)
    dm = TruthfulQADataModule(path=data_path)
    n = len(dm.load_examples())
    excluded = set().union(*used.values())
    return {"file": data_path, "questions": n, "excluded": len(excluded), "excluded_by": {k: len(v) for k, v in used.items()},
            "pool": sorted(set(range(n)) - excluded)}


class FreshTruthfulQA(TruthfulQADataModule):
    """TruthfulQA whose calib and test questions come only from ``pool`` (file rows), drawn by ``seed``;
    train is a seeded draw of the remaining questions (outside this seed's calib and test)."""

    def __init__(self, pool: list[int], sizes: dict[str, int] = FRESH_SIZES, **kwargs):
        super().__init__(**kwargs)
        self.pool, self.sizes = set(pool), dict(sizes)

    def split_examples(self, examples):
        pool = [ex for ex in examples if ex.index in self.pool]
        need = self.sizes["calib"] + self.sizes["test"]
        if len(pool) < need:
            raise ValueError(f"the fresh pool has {len(pool)} questions; calib + test need {need}")
        drawn, _ = seeded_split(pool, (need / len(pool), 1 - need / len(pool)), self.seed)
        calib, test = seeded_split(drawn, (self.sizes["calib"] / need, self.sizes["test"] / need), self.seed + 1)
        held = {ex.index for ex in drawn}
        rest = [ex for ex in examples if ex.index not in held]
        train, _ = seeded_split(rest, (self.sizes["train"] / len(rest), 1 - self.sizes["train"] / len(rest)), self.seed + 2)
        return train, calib, test


class DrawnTestCommonsense(CommonsenseDataModule):
    """A commonsense set with a train file whose test questions are a seeded draw of the test file
    (the parent keeps the whole file, so ``limit_test`` would give every seed its first rows), outside
    ``exclude`` (rows an earlier cell reported)."""

    def __init__(self, exclude: tuple[int, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.exclude = set(exclude)

    def split_examples(self, examples):
        train, calib, _, test = super().split_examples(examples)  # val_fraction=0: no val split
        test = [ex for ex in test if ex.index not in self.exclude]
        share = min(1.0, (self.limits[-1] or len(test)) / len(test))
        return train, calib, seeded_split(test, (share, 1 - share), self.seed + 1)[0]


def committed_cells(*dirs: Path) -> list[dict]:
    """Every cell file (``*-epoch*.json``) in ``dirs``."""
    return [json.loads(path.read_text()) for d in dirs for path in sorted(Path(d).glob("*-epoch*.json"))]


def reported_test_rows(test_file: str, cells: list[dict] | None = None) -> set[int]:
    """Rows of ``test_file`` that ``cells`` (default: the committed round-1 cells) report as test."""
    cells = committed_cells(ROOT / "results" / "grid") if cells is None else cells
    return {row for cell in cells if cell.get("split_files", {}).get("test") == test_file for row in cell["split"]["test"]}


def commonsense_demo(test: str, train: str, root: str = COMMONSENSE):
    """The demo-like regime on a commonsense set: the demo's 490 training questions (and its LR, see
    ``DEMO_LR``); zero-shot, as these sets ship no fixed few-shot prompt."""
    test_file = f"{root}/{test}"
    return lambda seed: DrawnTestCommonsense(
        test_path=test_file, train_path=f"{root}/{train}", exclude=tuple(sorted(reported_test_rows(test_file))),
        seed=seed, limit_train=490, limit_calib=60, limit_test=150, max_length=256, val_fraction=0.0,
    )


def demo_truthfulqa(seed: int) -> TruthfulQADataModule:
    """The README demo's regime: instruction + six-shot prompt, all 490 train questions; calib and test
    are the first 50 / 80 questions of the seed's 163 / 164 (scoring cost on 2 cores)."""
    return TruthfulQADataModule(few_shot=True, instruction=True, seed=seed, limit_calib=50, limit_test=80, max_length=512,
                                split=PAPER_SPLIT)


def fresh_demo(seed: int):
    record = json.loads(FRESH_POOL.read_text())
    return FreshTruthfulQA(pool=record["pool"], path=record["file"], few_shot=True, instruction=True, seed=seed,
                           max_length=512)


def calibration_cost_questions(calibration_seconds: float, train_epoch_seconds: float, train_questions: int) -> int:
    """The equal-cost baseline's extra training: as many questions as the calibration pass took the
    time of (at the epoch's measured seconds per question), at least 1."""
    if train_epoch_seconds <= 0 or train_questions <= 0:
        raise ValueError("need a timed training epoch")
    return max(1, math.ceil(calibration_seconds * train_questions / train_epoch_seconds))


@dataclass(frozen=True)
class Task:
    """What a grid task is: its data (a DataModule for a seed) and what its cells train and score."""

    data: Callable[[int], ChoiceDataModule]
    learning_rate: float | None = None  # None: the adapter's LEARNING_RATE
    plus_one: bool = True  # train one epoch past the last evaluated one, scored plain ("+1 epoch")
    fractions: tuple[float, ...] = ()  # the training-budget curve: also scored at these fractions of epoch 1
    cal_baseline: bool = False  # also scored plain after epoch 1 + the calibration's cost ("1+cal")
    fresh: bool = False  # calib and test drawn from the fresh pool
    gammas: tuple[float, ...] = tuple(GAMMAS)  # the contrastive γ grid
    gamma_limits: bool = False  # the grid closed by its limits γ = ±∞ (TruthfulQA metrics only)
    precision: str | None = None  # the warm start's, fixed (None: bf16 where the CPU has it natively, else fp32)
    cross: str | None = None  # also score each model on this task's seeds' test questions it did not see


def zero_shot_truthfulqa(seed: int) -> TruthfulQADataModule:
    # Zero-shot prompts keep the grid within 2 CPU cores; the README demo uses the six-shot prompt.
    return TruthfulQADataModule(few_shot=False, instruction=False, seed=seed, limit_train=200, limit_calib=60,
                                limit_test=100, max_length=256, split=PAPER_SPLIT)


DEMO_LR = 5e-5  # the demo regime keeps the paper's rate
# Round 2 (research/round2.sh): both equal-cost baselines, on the wide γ grid.
ROUND2 = {"cal_baseline": True, "gammas": WIDE_GAMMAS}
GAP = {"learning_rate": DEMO_LR, "plus_one": False, "cal_baseline": True, "gammas": CLOSED_GAMMAS, "gamma_limits": True}
TASKS = {
    "truthfulqa": Task(zero_shot_truthfulqa),
    # The README demo's regime: instruction + six-shot prompt, all 490 train questions, LR 5e-5.
    # Calib and test are the first 50 / 80 questions of the seed's 163 / 164 (scoring cost on 2 cores).
    # Trained only to its last evaluated epoch: the 490-step epoch cost 20 min on the first grid's CPU.
    "truthfulqa_demo": Task(demo_truthfulqa, learning_rate=DEMO_LR, plus_one=False),
    "arc_easy": Task(commonsense("ARC-Easy/test.json", "ARC-Easy/train.json")),
    "arc_challenge": Task(commonsense("ARC-Challenge/test.json", "ARC-Challenge/train.json")),
    "boolq": Task(commonsense("boolq/test.json", "boolq/train.json")),
    "piqa": Task(commonsense("piqa/test.json")),
    "hellaswag": Task(commonsense("hellaswag/test_approx_tagstripped.json")),
    # The demo's prompt and training size on the fresh pool (results/fresh_pool.json; `python -m research.grid
    # --make-pool`), with the training-budget curve; epoch 2 is an evaluated epoch (the "+1 epoch" of epoch 1).
    # Its cells ran at LoRA's grid rate 5e-4, not the demo's 5e-5 (they record it): see truthfulqa_gap_* for 5e-5.
    "truthfulqa_fresh": Task(fresh_demo, learning_rate=5e-4, plus_one=False, fractions=(0.25, 0.5), fresh=True,
                             **ROUND2),
    # The zero-shot TruthfulQA cells again (same seeds, so the same splits) with both baselines ...
    "truthfulqa_equal_cost": Task(zero_shot_truthfulqa, **ROUND2),
    # ... and commonsense sets in the demo-like regime.
    "arc_easy_demo": Task(commonsense_demo("ARC-Easy/test.json", "ARC-Easy/train.json"), learning_rate=DEMO_LR, **ROUND2),
    "arc_challenge_demo": Task(commonsense_demo("ARC-Challenge/test.json", "ARC-Challenge/train.json"),
                               learning_rate=DEMO_LR, **ROUND2),
    "boolq_demo": Task(commonsense_demo("boolq/test.json", "boolq/train.json"), learning_rate=DEMO_LR, **ROUND2),
    # The fresh seeds again to epoch 1 (¼, ½, 1), scored on the closed γ grid: the wide grid's edge picks.
    "truthfulqa_fresh_closed": Task(fresh_demo, learning_rate=DEMO_LR, plus_one=False, fractions=(0.25, 0.5),
                                    fresh=True, gammas=CLOSED_GAMMAS, gamma_limits=True),
    # The gap experiment (issue 41): why round 1's demo seeds gain ~+10 MC2 and the fresh seeds ~+1. Both groups
    # at the documented demo regime (LR 5e-5, batch 1, fp32 so that every CPU kind trains alike) for 2 epochs,
    # both equal-cost baselines, the closed γ grid, and each model scored on the other group's test questions.
    "truthfulqa_gap_fresh": Task(fresh_demo, precision="32-true", cross="truthfulqa_gap_demo", fresh=True, **GAP),
    "truthfulqa_gap_demo": Task(demo_truthfulqa, precision="32-true", cross="truthfulqa_gap_fresh", **GAP),
}
GAP_SEEDS = {"truthfulqa_gap_fresh": (10, 11, 12, 13, 14), "truthfulqa_gap_demo": (0, 1, 2)}  # round 2's, round 1's
for _name, _task in TASKS.items():
    if _task.cross and _task.cross not in GAP_SEEDS:
        raise ValueError(f"task {_name}: cross-scores on {_task.cross}, whose seeds GAP_SEEDS does not name")
# Checked before any training: acc_norm's limit is not the limit scores' acc_norm (length-normalised).
for _name, _task in TASKS.items():
    if _task.gamma_limits and not is_truthfulqa(_name):
        raise ValueError(f"task {_name}: the γ limits are for TruthfulQA's metrics (of the raw scores) only")
# The two headline metrics of each task, primary first (calib selection uses the primary one).
METRICS = {task: HEADLINE_METRICS["truthfulqa" if is_truthfulqa(task) else "choice"] for task in TASKS}
PRIMARY = {task: metrics[0] for task, metrics in METRICS.items()}
# Cell file format; report.py reads it. 2: independent seeds, per-question calib and test values of
# every variant for both headline metrics (``per_question``), ``split``, ``deterministic_init``.
FORMAT = 2
# peft starts IA3's scaling vectors at 1 (the identity) and IA3 has no dropout: the seed changes
# nothing in the model, only the data split and order. Every other adapter draws its init.
DETERMINISTIC_INIT = {"ia3"}
# Raised from the paper's 5e-5 (which the README demo keeps): at 5e-5, 200 zero-shot questions move
# SmolLM2's test MC2 by 0.04 points -- a warm start too weak to say anything about steering.
LEARNING_RATE = {"lora": 5e-4, "ia3": 3e-3, "prompt_tuning": 1e-2, "p_tuning": 1e-2, "prefix_tuning": 1e-2}

# (task, adapter, epochs evaluated, seeds) in run order. Every cell trains one epoch past its last
# evaluated epoch and scores the plain adapter there: epoch e+1 is the equal-cost "+1 epoch" baseline
# of epoch e. LoRA on TruthfulQA first (3 seeds x 3 epochs), then the rest one seed at a time, so an
# interrupted grid still covers every row; ARC-Easy and ARC-Challenge get the full 3-epoch ablation.
OTHERS = [("arc_easy", "lora", (1, 2, 3)), ("arc_challenge", "lora", (1, 2, 3)), ("truthfulqa", "ia3", (1,)),
          ("truthfulqa", "prompt_tuning", (1,)), ("truthfulqa", "prefix_tuning", (1,)), ("truthfulqa", "p_tuning", (1,)),
          ("boolq", "lora", (1,)), ("piqa", "lora", (1,)), ("hellaswag", "lora", (1,))]
GRID = [("truthfulqa_demo", "lora", (1,), (0, 1, 2)), ("truthfulqa", "lora", (1, 2, 3), (0, 1, 2)),
        ("truthfulqa_fresh", "lora", (1, 2), (10, 11, 12, 13, 14))] + [
    (task, adapter, epochs, (seed,)) for seed in (0, 1, 2) for task, adapter, epochs in OTHERS
] + [(task, "lora", (1,), (10, 11, 12)) for task in ("arc_easy_demo", "arc_challenge_demo", "boolq_demo")] + [
    ("truthfulqa_equal_cost", "lora", (1,), (0, 1))] + [  # round 1's zero-shot seeds: the same splits
    ("truthfulqa_equal_cost", adapter, (1,), (0,)) for adapter in ("ia3", "prompt_tuning")] + [  # round 1's one seed
    ("truthfulqa_fresh_closed", "lora", (1,), (10, 11, 12, 13, 14))] + [
    ("truthfulqa_gap_demo" if seed < 10 else "truthfulqa_gap_fresh", "lora", (1, 2), (seed,))
    for seed in (0, 10, 1, 11, 2, 12, 13, 14)]  # the gap experiment: its two groups alternate, so a cut keeps both


def per_question(task: str, table: dict, score: torch.Tensor, limit: bool = False) -> dict[str, torch.Tensor]:
    """Both headline metrics' families and the multiple-choice loss per question (a contrastive
    ``limit`` has no finite loss)."""
    fn = truthfulqa_per_question if is_truthfulqa(task) else choice_accuracy_per_question
    rows = {**table, "score": score}
    return fn(**rows) if limit else {**fn(**rows), "choice_nll": choice_nll_per_question(**rows)}


SPLITS = ("train", "calib", "test")


def split_record(dm) -> dict[str, list[int]]:
    """The file rows (``ChoiceExample.index``) of each split's questions, as used (after the limits).

    Recorded per cell so that splits can be checked for overlap and re-created without the code.
    """
    dm.prepare_data()
    return {name: [ex.index for ex in getattr(dm, f"{name}_set")] for name in SPLITS}


def prompt_of(dm) -> str:
    """What a cell's prompts are, as its rows' labels name it (recorded in every cell)."""
    if isinstance(dm, TruthfulQADataModule):
        return {(True, True): "instruction + six-shot", (False, True): "six-shot", (True, False): "instruction, zero-shot",
                (False, False): "zero-shot"}[(dm.instruction, dm.few_shot)]
    if isinstance(dm, CommonsenseDataModule):
        return f"zero-shot, {dm.scoring}"
    raise TypeError(f"no prompt description for {type(dm).__name__}")


def split_sources(dm) -> dict[str, str]:
    """The file each split's rows index into: ARC/BoolQ take train and calib from their train file."""
    if isinstance(dm, CommonsenseDataModule):
        train = dm.train_path or dm.test_path
        return {"train": train, "calib": train, "test": dm.test_path}
    return {name: dm.path for name in SPLITS}


def init_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable parameters: equal across seeds exactly when the init ignores the seed."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def is_current(path: Path) -> bool:
    """A cell file written in this ``FORMAT`` (an older one is rerun: its seeds shared one split)."""
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("format", 1) == FORMAT
    except (OSError, ValueError):
        return False


def per_question_lists(task: str, per_split: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, list]]:
    """metric -> variant -> per-question values (questions in file order), for both headline metrics."""
    out = {}
    for metric in METRICS[task]:
        binary = metric in ("mc1", "acc", "acc_norm")
        out[metric] = {v: [int(x) if binary else round(float(x), 6) for x in per_q[metric]] for v, per_q in per_split.items()}
    return out


def calibration_needs(gammas=GAMMAS) -> CalibrationNeeds:
    """Everything the grid's strengths need from the one calibration pass of an epoch."""
    statistics = {a: SETTINGS.replace(alpha=alpha) if alpha else SETTINGS.replace(scoring_policy="none")
                  for a, alpha in ALPHAS.items()}  # none: no mask, as the StrengthSolver solves it
    for key, alpha in LD_MASKS.items():
        ld = SETTINGS.replace(direction="logit_difference")
        statistics[key] = ld.replace(alpha=alpha) if alpha else ld.replace(scoring_policy="none")
    return CalibrationNeeds(statistics=statistics, choice_caches=dict(CHOICE_FITS), grids={"contrastive": tuple(gammas)})


def strengths(result: CalibrationPass) -> tuple[dict[str, dict[str, float]], dict]:
    """μ for every (α or direction, strength option) from the pass, plus diagnostics."""
    mus = {}
    for a in ALPHAS:
        summary = result.tokens[a].stats.summary()
        mus[a] = {s: summary[s] for s in STRENGTHS if s != "exact"}
        mus[a]["exact"] = result.tokens[a].cache.solve()
    for key in LD_MASKS:
        mus[key] = {"exact": result.tokens[key].cache.solve()}
    for key, fit in result.choice_caches.items():
        mus[key]["choice_nll"] = fit.cache.solve()
    mus["ld_none"]["choice_nll"] = result.grids["contrastive"].best()
    return mus, {"tokens": result.tokens["0.1"].stats.count}


def variant_configs(mus: dict[str, dict[str, float]], gammas=GAMMAS, gamma_limits: bool = False
                    ) -> dict[str, SteeringConfig | ContrastiveLimit]:
    """Every scoring variant of one epoch as a named :class:`SteeringConfig` (the cell files' names),
    and with ``gamma_limits`` the contrastive γ grid's limits ``contrastive_g±inf``."""
    out: dict[str, SteeringConfig | ContrastiveLimit] = {
        f"contrastive_g{g:+g}": SETTINGS.contrastive(gamma=g) for g in gammas}
    if gamma_limits:
        out.update({f"contrastive_g{limit.gamma:+g}": limit for limit in (ContrastiveLimit(1), ContrastiveLimit(-1))})
    ld = SETTINGS.replace(direction="logit_difference")
    for key, alpha in LD_MASKS.items():
        for strength, mu in mus.get(key, {}).items():
            if alpha is None:
                out[f"{key}_{strength}"] = ld.replace(mu=mu, scoring_policy="none")
            else:
                out[f"{key}_mask_generation_only_{strength}"] = ld.replace(mu=mu, alpha=alpha)
    for a, alpha in ALPHAS.items():
        if alpha is None:
            for s in NONE_STRENGTHS:
                out[f"svd_a{a}_none_{s}"] = SETTINGS.replace(mu=mus[a][s], scoring_policy="none")
            continue
        entries = [(f"svd_a{a}_{{pol}}_{s}", mu, ("mask_generation_only",) if s == "choice_nll" else
                    ("mask_generation_only", "floor")) for s, mu in mus[a].items()]
        if a == "0.1":
            entries += [(f"fixed_a0.1_{{pol}}_mu{m:+g}", m, ("mask_generation_only",)) for m in FIXED_MU]
        entries.append((f"maskonly_a{a}", 0.0, ("floor",)))  # the paper's mask alone
        for template, mu, policies in entries:
            for pol in policies:
                out[template.format(pol=pol)] = SETTINGS.replace(mu=mu, alpha=alpha, scoring_policy=pol)
    return out


@torch.no_grad()
def score_split(model, loader, task, configs: dict[str, SteeringConfig] | None, desc: str,
                prefixes: PrefixCache | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
    """variant -> metric -> per-question values, and the question ids (file rows) in that order.

    ``configs`` None: the plain adapter alone (the "+1 epoch" baseline needs no pre-trained pass).
    fp32 whatever the warm start's precision, as the CLI scores (``SteeringLM.score_batch``).
    """
    table = {k: [] for k in ("question_index", "choice_set", "choice_index", "is_true", "num_chars")}
    scores: dict[str, list] = {}
    limits = {name for name, c in (configs or {}).items() if isinstance(c, ContrastiveLimit)}  # −∞ off each set's top
    for batch in track(loader, desc, unit="batch"):
        rows = score_choice_variants(model, batch, configs or {}, with_base=configs is not None, prefixes=prefixes)
        rows.pop("num_tokens")
        for name, row_scores in rows.items():
            if not (torch.isfinite(row_scores) | ((name in limits) & (row_scores == float("-inf")))).all():
                raise FloatingPointError(f"non-finite scores in variant {name}")
            scores.setdefault(name, []).append(row_scores.double())
        for k in table:
            table[k].append(batch[k])
    table = {k: torch.cat(v) for k, v in table.items()}
    ids = torch.unique(table["question_index"]).tolist()  # the metrics' question order (sorted ids)
    return {name: per_question(task, table, torch.cat(v), name in limits) for name, v in scores.items()}, ids


class EpochProbe(L.Callback):
    """Scores a cell at the end of each evaluated epoch and, as its :class:`Task` asks, at fractions
    of the first epoch (the training-budget curve) and after the equal-cost extra training of
    :func:`calibration_cost_questions` past epoch 1 (plain only)."""

    def __init__(self, cell: dict, epochs: set[int], out_dir: Path, train_only: bool = False):
        self.cell, self.epochs, self.out_dir, self.train_only = cell, epochs, out_dir, train_only
        # Scored plain only: the "+1 epoch" baseline of the last evaluated epoch (None: not trained).
        self.task = TASKS[cell["task"]]
        self.plus_one = max(epochs) + 1 if self.task.plus_one else None
        self.fractions, self.cal_baseline = self.task.fractions, self.task.cal_baseline
        self.epoch_start = self.probing = 0.0  # probing: seconds of this epoch spent scoring mid-epoch
        self.extra = None  # the +cal baseline's extra training questions (set in epoch 2)

    def path(self, label: str) -> Path:
        return self.out_dir / f"{self.cell['name']}-epoch{label}.json"

    def is_done(self, label: str) -> bool:
        return is_current(self.path(label)) or (self.train_only and is_saved(self.out_dir, self.cell["name"], label))

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.probing = time.perf_counter(), 0.0
        # the +cal baseline's question count, read once (epoch 1's file: also after a resume)
        first = self.path("1")
        self.extra = json.loads(first.read_text()).get("calibration_cost_questions") if (
            self.cal_baseline and trainer.current_epoch == 1 and first.exists()) else None

    def _training_seconds(self) -> float:
        return time.perf_counter() - self.epoch_start - self.probing

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self.fractions or self.cal_baseline):
            return
        step, steps = batch_idx + 1, trainer.num_training_batches
        label, plain_only = None, False
        if trainer.current_epoch == 0:
            label = next((f"{f:g}" for f in self.fractions if step == max(1, round(f * steps)) and f < 1), None)
        elif self.extra and self._first_step_past(step, trainer.datamodule.train_batch_size, self.extra):
            label, plain_only = "1+cal", True
        if label is None or self.is_done(label):
            return
        start = time.perf_counter()
        self._probe(trainer, pl_module, label, plain_only, self._training_seconds(), step,
                    epoch=trainer.current_epoch + step / trainer.num_training_batches)
        self.probing += time.perf_counter() - start

    @staticmethod
    def _first_step_past(step: int, batch_size: int, questions: int) -> bool:
        """The step whose batch brings the questions trained this epoch to ``questions`` or past it."""
        return (step - 1) * batch_size < questions <= step * batch_size

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs | {self.plus_one} or self.is_done(str(epoch)):
            return
        self._probe(trainer, pl_module, str(epoch), epoch == self.plus_one, self._training_seconds(),
                    trainer.num_training_batches, epoch)

    def _probe(self, trainer, pl_module, label: str, plain_only: bool, train_seconds: float, step: int,
               epoch: float):
        """Keep the adapter as trained so far (``epoch``: epochs of training, ``step`` of the current one),
        then score it, unless the grid only trains (``--train-only``: ``--score-saved`` scores it later)."""
        point = {"label": label, "plain_only": plain_only, "train_seconds": train_seconds, "step": step, "epoch": epoch}
        save_adapter(self.out_dir, self.cell, point, pl_module.model, trainer.datamodule.limits)
        if self.train_only:
            # A scored probe opens these loaders, and each opened loader draws its base seed from the
            # global RNG that dropout and the next epoch's shuffle use: open them so training goes on
            # exactly as it would after scoring (tested: --train-only + --score-saved = scoring in place).
            for loader in ([] if plain_only else [trainer.datamodule.calib_choice_dataloader()]) + [
                    trainer.datamodule.choice_dataloader("calib"), trainer.datamodule.test_dataloader()]:
                iter(loader)
            print(f"[{self.cell['name']} epoch {label}] adapter kept ({train_seconds:.0f} s training)", flush=True)
            return
        probe(pl_module.model, trainer.datamodule, self.cell, point, self.path(label), pl_module.prefixes)


def probe(model, dm, cell: dict, point: dict, path: Path, prefixes: PrefixCache | None = None) -> None:
    """Score a cell's model at one training budget (``point``: its label, epoch, step, training seconds
    and whether only the plain adapter is scored) and write the cell file ``path``."""
    label, plain_only, train_seconds, step, epoch = (point[k] for k in ("label", "plain_only", "train_seconds", "step", "epoch"))
    task = cell["task"]
    spec = TASKS[task]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    gammas = spec.gammas
    if plain_only:
        mus, diag, configs, calib_configs = None, None, None, None
    else:
        result = calibrate_pass(model, dm.calib_choice_dataloader(), SETTINGS, calibration_needs(gammas),
                                desc="Calibration (every variant)", prefixes=prefixes)
        mus, diag = strengths(result)
        configs = variant_configs(mus, gammas, spec.gamma_limits)
        # choice_nll variants are scored on test only: their μ is fit to the calib questions' loss
        calib_configs = {name: c for name, c in configs.items() if "choice_nll" not in name}
    t1 = time.perf_counter()
    calib, calib_ids = score_split(model, dm.choice_dataloader("calib"), task, calib_configs, "Scoring calib", prefixes)
    t2 = time.perf_counter()
    test, test_ids = score_split(model, dm.test_dataloader(), task, configs, "Scoring test", prefixes)
    t3 = time.perf_counter()
    if spec.cross and not plain_only:
        cross_score(model, dm, cell, point, configs, path, prefixes)
    model.train(was_training)
    split = split_record(dm)
    for name, ids in (("calib", calib_ids), ("test", test_ids)):  # per-question lists follow `split`
        if ids != split[name]:
            raise RuntimeError(f"{name}: the scored question ids are not the split's rows in file order")
    payload = {
        "format": FORMAT,
        **cell,
        "epoch": epoch,
        "baseline_only": plain_only,
        "sizes": {"train": len(dm.train_set), "calib": len(dm.calib_set), "test": len(dm.test_set)},
        "primary": PRIMARY[task],
        "mu": mus,
        "calibration": diag,
        "seconds": {"train_epoch": train_seconds, "calibration": t1 - t0, "score_calib": t2 - t1, "score_test": t3 - t2},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "calib": {v: {m: float(x.mean()) for m, x in per_q.items()} for v, per_q in calib.items()},
        "test": {v: {m: float(x.mean()) for m, x in per_q.items()} for v, per_q in test.items()},
        "test_per_question": {
            v: [round(float(x), 4) for x in per_q[PRIMARY[task]]] for v, per_q in test.items()
        },
        "metrics": list(METRICS[task]),
        # split -> metric -> variant -> values, questions in the order of `split` (ascending file row)
        "per_question": {"calib": per_question_lists(task, calib), "test": per_question_lists(task, test)},
        "split": split,
        "split_files": split_sources(dm),
        "gammas": list(gammas),  # finite; "contrastive_g±inf" are the limits where gamma_limits
        "gamma_limits": spec.gamma_limits,
    }
    payload.update(label=label, step=step)
    if not label.isdigit():  # a budget point or the +calibration-cost baseline (mid-epoch)
        payload["budget"] = "calibration_cost" if plain_only else "fraction"
    if label == "1" and spec.cal_baseline:  # the equal-cost baseline's extra training, measured here
        # at most one more epoch (then it is the "+1 epoch" baseline): a cell's epoch 2 holds the probe
        payload["calibration_cost_questions"] = min(calibration_cost_questions(t1 - t0, train_seconds, len(dm.train_set)),
                                                    len(dm.train_set))
    if spec.fresh:
        payload["fresh"] = True
    if is_truthfulqa(task):  # MC1 per question too (0/1), the other headline number
        payload["test_per_question_mc1"] = {v: [int(x) for x in per_q["mc1"]] for v, per_q in test.items()}
    run_files.write_json(path, payload)
    head = PRIMARY[task]
    if mus is None:
        print(f"[{cell['name']} epoch {label}] {head}: plain {payload['test']['plain'][head]:.4f} "
              f"({'equal-cost' if label == '1+cal' else '+1 epoch'} baseline; {t3 - t0:.0f} s scoring, {train_seconds:.0f} s training)", flush=True)
        return
    print(
        f"[{cell['name']} epoch {label}] {head}: base {payload['test']['base'][head]:.4f} "
        f"plain {payload['test']['plain'][head]:.4f} exact(α=0.1) "
        f"{payload['test']['svd_a0.1_mask_generation_only_exact'][head]:.4f} μ={mus['0.1']['exact']:+.4f} "
        f"({t3 - t0:.0f} s scoring, {train_seconds:.0f} s training)",
        flush=True,
    )


# -- the gap experiment's cross-scoring: each group's models on the other group's test questions -----------
class RowsTruthfulQA(TruthfulQADataModule):
    """TruthfulQA whose test split is the file rows ``rows`` (no train or calib), less any question whose
    prompt is in ``exclude_prompts`` (a duplicate of one the model saw under another row)."""

    def __init__(self, rows: list[int], exclude_prompts: frozenset[str] = frozenset(), **kwargs):
        super().__init__(**kwargs)
        self.rows, self.exclude_prompts = set(rows), exclude_prompts

    def split_examples(self, examples):
        return [], [], [ex for ex in examples if ex.index in self.rows and ex.prompt not in self.exclude_prompts]


def group_test_rows(task: str) -> list[int]:
    """The test rows (file rows, ascending) of every seed of a gap-experiment group (:data:`GAP_SEEDS`)."""
    return sorted({row for seed in GAP_SEEDS[task] for row in split_record(TASKS[task].data(seed))["test"]})


def cross_path(path: Path) -> Path:
    """Where a cell file's cross-scoring goes: ``<out>/cross/<cell>-epoch<label>-cross.json``."""
    return path.parent / "cross" / f"{path.stem}-cross.json"


def cross_score(model, dm, cell: dict, point: dict, configs: dict, path: Path, prefixes: PrefixCache | None = None) -> None:
    """Score every variant of this point (μ and γ from the model's own calib) on the other group's test
    questions that the model neither trained nor calibrated on, and write :func:`cross_path`. Written
    before the cell file, so a finished cell has it; the global RNG is left as it was, so training goes
    on as it would without it."""
    task = cell["task"]
    other_task = TASKS[task].cross
    seen = {ex.index for ex in (*dm.train_set, *dm.calib_set)}
    group = group_test_rows(other_task)
    unseen = [r for r in group if r not in seen][: cell.get("smoke_limit")]  # a smoke test scores a few
    cross = RowsTruthfulQA(unseen, frozenset(ex.prompt for ex in (*dm.train_set, *dm.calib_set)),
                           path=dm.path, few_shot=dm.few_shot, instruction=dm.instruction, max_length=dm.max_length,
                           batch_size=dm.batch_size, seed=cell["seed"])
    cross.tokenizer = dm.tokenized.tokenizer
    cross.setup("test")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        scores, ids = score_split(model, cross.test_dataloader(), task, configs, f"Scoring {other_task}'s test", prefixes)
    if ids != [ex.index for ex in cross.test_set]:
        raise RuntimeError("cross: the scored question ids are not the rows in file order")
    run_files.write_json(cross_path(path), {
        "format": FORMAT, **cell, "label": point["label"], "epoch": point["epoch"], "cross_task": other_task,
        "rows": ids, "group_rows": len(group), "seen_by_model": len(group) - len(ids),
        "seconds": time.perf_counter() - t0,
        "test": {v: {m: float(x.mean()) for m, x in per_q.items()} for v, per_q in scores.items()},
        "per_question": per_question_lists(task, scores),
    })
    head = PRIMARY[task]
    print(f"[{cell['name']} epoch {point['label']}] on {other_task}'s {len(ids)} unseen test questions: {head} plain "
          f"{scores['plain'][head].mean():.4f}", flush=True)


# -- adapters kept per scored point: a grid extended later (a wider γ grid, a new variant) re-scores them
# without re-training (``--score-saved``). Local only (``.tmp`` is ignored): a LoRA adapter is ~4 MB.
def saved_dir(out_dir: Path, name: str, label: str) -> Path:
    return out_dir / ".tmp" / "adapters" / f"{name}-epoch{label}"


def is_saved(out_dir: Path, name: str, label: str) -> bool:
    return (saved_dir(out_dir, name, label) / "point.json").exists()


def four_limits(limits) -> tuple:
    """A DataModule's (train, calib, val, test) limits; adapters saved before the val split recorded three."""
    limits = tuple(limits)
    return limits if len(limits) == 4 else (*limits[:2], None, limits[2])


def save_adapter(out_dir: Path, cell: dict, point: dict, model, limits) -> Path:
    """The adapter (peft ``save_pretrained``) with the cell, the training point it was taken at and the
    DataModule's split limits (so that scoring it draws the same split)."""
    target = saved_dir(out_dir, cell["name"], point["label"])
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    run_files.write_json(tmp / "point.json", {"format": FORMAT, "cell": cell, "point": point, "limits": list(limits)})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # whole or absent: point.json marks it complete
    return target


def score_saved(out_dir: Path, only: list[str] | None = None, seeds: list[int] | None = None,
                labels: list[str] | None = None) -> None:
    """Score every kept adapter whose cell file is missing or of an older format (``--score-saved``);
    ``labels``: only these points, in this order."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    kept = [json.loads(p.read_text()) | {"dir": p.parent} for p in (out_dir / ".tmp" / "adapters").glob("*/point.json")]
    order = {label: k for k, label in enumerate(labels or [])}
    for saved in sorted(kept, key=lambda x: (order.get(x["point"]["label"], len(order)), x["dir"].name)):
        cell, point = saved["cell"], saved["point"]
        path = out_dir / f"{cell['name']}-epoch{point['label']}.json"
        if ((only and f"{cell['task']}-{cell['adapter']}" not in only) or (seeds and cell["seed"] not in seeds)
                or (labels and point["label"] not in labels)):
            continue
        if is_current(path):
            continue
        with claimed(out_dir, f"{cell['name']}-epoch{point['label']}") as mine:
            if not mine:
                continue
            print(f"[{cell['name']} epoch {point['label']}] scoring the kept adapter", flush=True)
            module = SteeringLM(model=cell["model"], adapter=cell["adapter"], learning_rate=cell["learning_rate"],
                                seed=cell["seed"])
            if init_fingerprint(module.model) != cell["init_fingerprint"]:
                raise RuntimeError(f"{saved['dir']}: the adapter's init differs from the cell's (another peft or torch?)")
            set_peft_model_state_dict(module.model, load_file(saved["dir"] / "adapter_model.safetensors"))
            dm = TASKS[cell["task"]].data(cell["seed"])
            dm.limits, dm.tokenizer = four_limits(saved["limits"]), module.tokenizer
            dm.setup("fit")
            probe(module.model, dm, cell, point, path, module.prefixes)


@contextlib.contextmanager
def claimed(out_dir: Path, name: str):
    """Yields whether this process owns the cell: several ``grid.py`` processes can share one grid.

    The lock file holds the owner's PID; a lock whose process is gone (a killed run) is taken over.
    """
    lock = out_dir / ".tmp" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text()), 0)
            owner_alive = True
        except ProcessLookupError:
            owner_alive = False
        except (ValueError, OSError):
            owner_alive = True  # being written this instant, or not ours to signal
        if owner_alive:
            yield False
            return
        lock.unlink(missing_ok=True)
        with claimed(out_dir, name) as ok:
            yield ok
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def run_cell(task: str, adapter: str, seed: int, epochs: tuple[int, ...], out_dir: Path,
             model: str = "smollm2-135m", limit: int | None = None, precision: str | None = None,
             train_only: bool = False) -> None:
    name = f"{task}-{adapter}-seed{seed}"
    wanted = set(epochs)
    if train_only and TASKS[task].cal_baseline:
        raise ValueError(f"{task}: --train-only cannot place the +calibration-cost point (it needs epoch 1's "
                         "calibration time)")
    done = lambda: all(is_current(out_dir / f"{name}-epoch{e}.json") or (train_only and is_saved(out_dir, name, e))  # noqa: E731
                       for e in probe_labels(task, wanted))
    if done():
        print(f"[{name}] done, skipping", flush=True)
        return
    with claimed(out_dir, name) as mine:
        if not mine:
            print(f"[{name}] running in another process, skipping", flush=True)
            return
        _train_and_probe(name, task, adapter, seed, wanted, out_dir, model, limit, precision, train_only)
        if done():
            shutil.rmtree(checkpoint_dir(out_dir, name), ignore_errors=True)  # the resume checkpoint (~0.5 GB)


def probe_labels(task: str, epochs) -> set[str]:
    """The file labels a finished cell has: its evaluated epochs, its "+1 epoch" baseline, the
    fractions of epoch 1 and the "+calibration cost" baseline ("1+cal") where its task has them."""
    labels = {str(e) for e in set(epochs) | {final_epoch(task, epochs)}}
    labels |= {f"{f:g}" for f in TASKS[task].fractions}
    if TASKS[task].cal_baseline:
        labels.add("1+cal")
    return labels


def final_epoch(task: str, epochs) -> int:
    """The last epoch a cell trains: one past its last evaluated epoch (the "+1 epoch" baseline)."""
    return max(epochs) + TASKS[task].plus_one


def checkpoint_dir(out_dir: Path, name: str) -> Path:
    """Per format: a checkpoint of an older format trained on another split and must not be resumed."""
    return out_dir / ".tmp" / f"{name}-format{FORMAT}"


def _train_and_probe(name: str, task: str, adapter: str, seed: int, wanted: set[int], out_dir: Path,
                     model: str, limit: int | None, precision: str | None = None, train_only: bool = False) -> None:
    print(f"[{name}] start {time.strftime('%H:%M:%S')}", flush=True)
    L.seed_everything(seed, workers=True)
    learning_rate = TASKS[task].learning_rate or LEARNING_RATE[adapter]
    module = SteeringLM(model=model, adapter=adapter, learning_rate=learning_rate, seed=seed)
    dm = TASKS[task].data(seed)
    if limit is not None:  # smoke tests
        dm.limits = (limit, limit, None, limit)
    fixed = TASKS[task].precision
    precision, why = ((precision, "set with --precision") if precision else (fixed, "the task's") if fixed
                      else fast_precision("cpu"))
    print(f"[{name}] precision {precision} ({why})", flush=True)
    cell = {"name": name, "task": task, "adapter": adapter, "seed": seed, "model": model,
            "learning_rate": learning_rate, "precision": precision, "cpu": describe_cpu(),
            "train_batch_size": dm.train_batch_size, "data_seed": dm.seed, "prompt": prompt_of(dm),
            "deterministic_init": adapter in DETERMINISTIC_INIT, "init_fingerprint": init_fingerprint(module.model)}
    if limit is not None:
        cell["smoke_limit"] = limit  # questions per split: a smoke test, not a result
    # An end-of-epoch checkpoint lets a killed grid resume this cell at its last finished epoch.
    ckpt_dir = checkpoint_dir(out_dir, name)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, filename="last", save_top_k=1, save_on_train_epoch_end=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=final_epoch(task, wanted), precision=precision,
        logger=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=str(ckpt_dir),
        callbacks=[EpochProbe(cell, wanted, out_dir, train_only), ckpt] + ([] if stderr_is_terminal() else [LogProgressBar()]),
    )
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "grid"))
    ap.add_argument("--seeds", type=int, nargs="+", help="these seeds of each cell (default: the grid's)")
    ap.add_argument("--only", nargs="*", help="cells as task-adapter, e.g. truthfulqa-lora")
    ap.add_argument("--model", default="smollm2-135m", help="tiny-random for a smoke test")
    ap.add_argument("--limit", type=int, help="questions per split (smoke tests)")
    ap.add_argument("--epochs", type=int, nargs="+", help="evaluate only these epochs of each cell (a scoped run)")
    ap.add_argument("--make-pool", action="store_true", help=f"write {FRESH_POOL.name} (the fresh questions) "
                    "from the committed cells and the demo's split, then exit")
    ap.add_argument("--precision", choices=["32-true", BF16],
                    help="the warm start's (calibration and scoring are fp32 either way); default: bf16-mixed "
                         "where the CPU has native bf16, else 32-true (set it to reproduce a cell)")
    ap.add_argument("--train-only", action="store_true",
                    help="train and keep each point's adapter without scoring it (score later with --score-saved)")
    ap.add_argument("--score-saved", action="store_true", help="score the kept adapters that have no current cell "
                    "file (after --train-only, or to re-score a grid extended since), then exit")
    ap.add_argument("--labels", nargs="+", help="with --score-saved: only these points (e.g. 1 0.5), in this order")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.make_pool:
        record = fresh_pool(ROOT / "results" / "grid", TruthfulQADataModule().path)  # the committed cells, whatever --out
        run_files.write_json(FRESH_POOL, record)
        print(f"{FRESH_POOL}: {len(record['pool'])} fresh of {record['questions']} questions "
              f"({record['excluded']} used by {len(record['excluded_by'])} sources)")
        return
    torch.set_num_threads(int(os.environ.get("GRID_THREADS", torch.get_num_threads())))
    if args.score_saved:
        score_saved(out, args.only, args.seeds, args.labels)
        return
    for task, adapter, epochs, seeds in GRID:
        if args.only and f"{task}-{adapter}" not in args.only:
            continue
        for seed in seeds:
            if args.seeds is None or seed in args.seeds:
                run_cell(task, adapter, seed, tuple(args.epochs or epochs), out, args.model, args.limit, args.precision,
                         args.train_only)


if __name__ == "__main__":
    main()
