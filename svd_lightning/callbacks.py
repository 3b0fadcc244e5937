"""Lightning callbacks that turn a warm-started adapter into SVDecode.

* :class:`SteeringExtraction` -- one no-grad pass over the calibration loader: steering vectors of
  every label token, their statistics (mean KL, kept fraction, ‖δz‖) and the sufficient
  statistics of the strength (all ranks merged).
* :class:`StrengthSolver` -- μ̄ from those statistics (mean / median / trimmed / pooled / exact,
  identity or Fisher curvature) or fit to the calibration multiple-choice loss (choice_nll), set on
  the module, logged, and written to ``steering.json``.
* :class:`ContrastiveBaseline` -- γ of the contrastive baseline ``z_φ + γ(z_φ − z_θ)``, fit to the
  calibration multiple-choice loss, so the module scores it next to SVDecode.
* :class:`SteeredValidation` -- prints the plain / base / steered (/ contrastive) table with paired
  bootstrap CIs and writes ``metrics.json`` and the per-question scores.
* :class:`LogitSnapshot` -- saves top-k pre-trained and warm-started logits of a probe batch.
* :class:`ScoreWriter` -- ``predict`` writes every question's plain / base / steered scores (JSONL).

Every solver declares what it needs in ``setup``; :func:`calibration_pass` then runs *one* pass over
the calibration questions per warm-start state for all of them (``steer/calibration_passes``).

Lightning validates *before* ``on_train_epoch_end``, so extraction and solving also run at
``on_validation_start`` whenever the weights changed since the last solve: the steered
validation of epoch k always uses the μ̄ of epoch k. No nested Trainer is started.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from svd_lightning.calibration import CalibrationNeeds, CalibrationPass, CalibrationResult, calibrate_pass
from svd_lightning.data.protocol import check_datamodule, datasets_of
from svd_lightning.figures import (CALIBRATION_FIGURE, calibration_figure, questions_figure, questions_figure_name,
                                   strength_grid)
from svd_lightning.decoding import paired_label_logits
from svd_lightning.metrics import HEADLINE_METRICS, variant_table
from svd_lightning.statistics import paired_bootstrap
from svd_lightning.logger import run_writer
from svd_lightning.progress import say
from svd_lightning.sharding import full_adapter_state, lockstep
from svd_lightning.run import METRICS_FILE, SteeringRun, tokenizer_hash
from svd_lightning.files import atomic_write_text
from svd_lightning.config import CURVATURES, SOLVED_STRENGTHS, VARIANT_LABELS, Curvature, SolvedStrength, SteeringConfig
from svd_lightning.steering import GAMMA_GRID



def calibration_loader(trainer: L.Trainer):
    """The DataModule's teacher-forced calibration batches (the contract: :mod:`svd_lightning.data.protocol`)."""
    check_datamodule(trainer.datamodule, None)
    return trainer.datamodule.calib_dataloader()


def choices_needed_by(needs: CalibrationNeeds) -> str | None:
    """What in ``needs`` scores the calibration choices (for an error that names it), or None."""
    who = (["strength 'choice_nll'"] if needs.choice_cache or needs.choice_caches else []) + [
        "the contrastive baseline's γ (contrastive_baseline: false skips it)" if name == "contrastive"
        else f"the {name} strength grid" for name in needs.grids]
    return " and ".join(who) or None


def choice_calibration_loader(trainer: L.Trainer, needs: CalibrationNeeds):
    """The calibration questions as choice batches, for what in ``needs`` scores them."""
    check_datamodule(trainer.datamodule, choices_needed_by(needs) or "scoring the calibration choices")
    return trainer.datamodule.calib_choice_dataloader()


def _my_batches(trainer: L.Trainer, loader, limit: int | None):
    """This rank's share of ``loader`` (batches ``i % world == rank`` of the first ``limit``) and its size."""
    total = len(loader) if limit is None else min(len(loader), limit)
    rank, world = trainer.global_rank, trainer.world_size
    mine = (batch for i, batch in enumerate(itertools.islice(loader, total)) if i % world == rank)
    return mine, len(range(rank, total, world))


def check_calibration_set(trainer: L.Trainer) -> None:
    """Fail before any training if there is nothing to solve μ̄ on."""
    loader = calibration_loader(trainer)
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise ValueError(
            "the calibration set is empty: the DataModule's calib_dataloader() yields no batches "
            "(check its calib split, e.g. `split`, `calib_fraction` or `limit_calib`)"
        )


def _gather_ragged(trainer: L.Trainer, t: torch.Tensor) -> torch.Tensor:
    """all_gather a [k, n_rank] tensor whose n differs by rank; returns [k, Σn]."""
    if trainer.world_size == 1:
        return t
    n = torch.tensor([t.shape[-1]], device=trainer.strategy.root_device)
    sizes = trainer.strategy.all_gather(n).flatten().tolist()
    padded = torch.zeros(t.shape[0], max(sizes), dtype=t.dtype, device=trainer.strategy.root_device)
    padded[:, : t.shape[-1]] = t
    gathered = trainer.strategy.all_gather(padded).cpu()  # [world, k, max]
    return torch.cat([gathered[r, :, : sizes[r]] for r in range(len(sizes))], dim=-1)


def log_steering(trainer: L.Trainer, pl_module, name: str, value: float) -> None:
    """``pl_module.log`` from the hooks that allow it; at the end of a fit (where Lightning refuses
    ``self.log``: :class:`CheckpointWeights` solving again) straight to the loggers, from rank zero."""
    if not pl_module.steering_state.fit_ended:  # every rank logs the same merged value (see SteeringLM._eval_epoch_end)
        pl_module.log(name, value, sync_dist=True)
    elif trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({name: value}, step=trainer.global_step)


def calibration_pass(trainer: L.Trainer, pl_module, needs: CalibrationNeeds, who: str) -> CalibrationPass:
    """The one calibration pass of the current weights, with all that the solvers declared and ``needs``.

    Solvers declare their needs in ``setup`` (``steering_state.needs``), so the first of them to ask
    after new weights runs one pass that serves them all, and the others read it from the module's
    ``steering_state``. Over the choice batches when a solver needs the choices (μ̄'s token
    statistics then come from their reference rows), else over the teacher-forced batches. Each rank
    takes its own share of the batches; the strategy's collectives merge them.
    """
    state = pl_module.steering_state
    state.needs.add(needs, who)
    known = state.calibration_at(trainer.global_step, needs)
    if known is not None:
        return known
    wanted = copy.deepcopy(state.needs)  # the record of this pass; later declarations do not change it
    options = dict(
        reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"), gather=lambda t: _gather_ragged(trainer, t),
        device=pl_module.device, progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
        step=trainer.global_step,
    )
    model, config = pl_module.model, pl_module.steering_config
    loader = choice_calibration_loader(trainer, wanted) if wanted.choices else calibration_loader(trainer)
    try:
        mine, count = _my_batches(trainer, loader, wanted.limit_batches)
        result = calibrate_pass(model, mine, config, wanted, total=count, **options)
        if result.tokens is not None and result.missing_references:
            say(f"{result.missing_references} calibration question(s) have no reference row among their choices "
                "(is_reference, see svd_lightning.batch): μ̄'s token statistics take a pass of their own over "
                "calib_dataloader()")
            mine, count = _my_batches(trainer, calibration_loader(trainer), wanted.limit_batches)
            references = CalibrationNeeds(tokens=wanted.tokens, statistics=dict(wanted.statistics))
            tokens = calibrate_pass(model, mine, config, references, total=count,
                                    desc="Calibration (reference answers)", **options)
            result = dataclasses.replace(result, tokens=tokens.tokens, passes=2, seconds=result.seconds + tokens.seconds)
    except FloatingPointError as err:
        raise FloatingPointError(f"{err}, after warm-start step {trainer.global_step}") from err
    state.calibration = result
    state.calibration_passes += result.passes
    diagnostics = {**(result.tokens["alpha"].diagnostics if result.tokens and "alpha" in result.tokens else {}),
                   **result.diagnostics}
    for k, v in diagnostics.items():
        log_steering(trainer, pl_module, f"steer/{k}", float(v))
    return result


class SteeringExtraction(L.Callback):
    """Steering vectors on the calibration set, after every warm-start epoch.

    It runs the calibration pass of the new weights (:func:`calibration_pass`: one pass for every
    solver) and logs its diagnostics: mean KL, kept fraction, ‖δz‖, tokens, passes.

    Args:
        limit_batches: use only the first k calibration batches (None: all).

    DDP: the callback builds its own loader (Lightning injects no DistributedSampler), so rank r
    takes batches ``i % world_size == r`` -- every calibration token is counted exactly once.
    """

    def __init__(self, limit_batches: int | None = None):
        self.limit_batches = limit_batches
        self.result: CalibrationResult | None = None

    @property
    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(tokens=True, limit_batches=self.limit_batches)

    def extract(self, trainer: L.Trainer, pl_module) -> CalibrationResult:
        """μ̄'s token statistics of the current weights, from the pass they share with every solver."""
        self.result = calibration_pass(trainer, pl_module, self.needs, type(self).__name__).tokens["alpha"]
        return self.result

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            check_calibration_set(trainer)
            pl_module.steering_state.needs.add(self.needs, type(self).__name__)

    def _maybe_extract(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.extract(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self._maybe_extract(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_extract(trainer, pl_module)

    def state_dict(self):
        return {"diagnostics": None if self.result is None else self.result.diagnostics}


class StrengthSolver(L.Callback):
    """Solve the global strength μ̄ on the calibration set and hand it to the module.

    Args:
        strength: ``exact`` minimises the calibration NLL of ``softmax(z_φ + μ δ̂)`` (convex; the
            objective steered scoring is judged by); ``mean`` is the paper (mean of per-token
            Newton steps); ``median`` / ``trimmed`` / ``pooled`` are robust alternatives;
            ``choice_nll`` minimises the calibration questions' multiple-choice loss under the
            scoring policy (NLL of the true choice, or of the true set for MC2-style sets; not
            convex: grid bracket + golden section), on the DataModule's ``calib_choice_dataloader()``
            (the same one calibration pass then serves every option).
        curvature: ``identity`` (the paper) or ``fisher`` for mean / median / trimmed / pooled.
        trim: the fraction cut at each tail by ``trimmed``.
        limit_batches: the first k calibration batches (one value for every solver: one pass).

    Whichever ``strength`` is chosen, ``aggregates`` in ``steering.json`` records every token-level
    option (and ``choice_nll`` when it was solved) on the same calibration set.
    """

    def __init__(
        self,
        strength: SolvedStrength = "exact",
        curvature: Curvature = "identity",
        trim: float = 0.1,
        limit_batches: int | None = None,
    ):
        if strength not in SOLVED_STRENGTHS:
            raise ValueError(f"strength must be one of {SOLVED_STRENGTHS}, got {strength!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.strength, self.curvature, self.trim = strength, curvature, trim
        self.limit_batches = limit_batches
        self.solution: dict | None = None

    @property
    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(tokens=True, choice_cache=self.strength == "choice_nll", limit_batches=self.limit_batches)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" or pl_module.mu is None:
            check_calibration_set(trainer)
            if self.strength == "choice_nll" and len(choice_calibration_loader(trainer, self.needs)) == 0:
                raise ValueError("strength 'choice_nll': calib_choice_dataloader() yields no batches")
            pl_module.steering_state.needs.add(self.needs, type(self).__name__)

    def solve(self, trainer: L.Trainer, pl_module) -> float:
        calibration = calibration_pass(trainer, pl_module, self.needs, type(self).__name__)
        result = calibration.tokens["alpha"]
        start = time.perf_counter()
        summary = result.stats.summary(self.trim)

        def allreduce(v: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(v.to(pl_module.device), reduce_op="sum").cpu()

        summary["exact"] = result.cache.solve(reduce=allreduce)
        diagnostics = {**result.diagnostics, **calibration.diagnostics}
        if self.strength == "choice_nll":
            summary["choice_nll"] = calibration.choices.cache.solve(reduce=allreduce)
            diagnostics.update(calibration.choices.diagnostics)
        key = self.strength if self.strength in ("exact", "choice_nll") else f"{self.strength}_{self.curvature}"
        mu = summary[key]
        if not math.isfinite(mu):
            raise FloatingPointError(f"the {key} strength is not finite ({mu}); see steer/* logs")
        pl_module.set_strength(mu)
        curve = self.curve(result, calibration, mu, summary["exact"], allreduce)
        self.solution = {
            "steering": pl_module.steering_config.replace(strength=self.strength, curvature=self.curvature,
                                                          trim=self.trim).to_dict(),
            "aggregates": summary,
            "diagnostics": diagnostics,
            "calibration_seconds": calibration.seconds + time.perf_counter() - start,
            "global_step": trainer.global_step,
        }
        writer = run_writer(trainer)
        if writer is not None:  # rank zero
            writer.write_json(CALIBRATION_CURVE_FILE, curve)
            writer.write_bytes(CALIBRATION_FIGURE, calibration_figure(
                curve["mu"], curve["token_nll"], mu, key, curve.get("choice_loss")))
        log_steering(trainer, pl_module, "steer/mu", mu)
        rank_zero_info(f"SVDecode strength μ̄ = {mu:+.4f} ({key}; all aggregates: "
                       + ", ".join(f"{k}={v:+.3g}" for k, v in summary.items() if k != "tokens") + ")")
        self._write(trainer, pl_module)
        return mu

    def curve(self, result: CalibrationResult, calibration: CalibrationPass, mu: float, exact: float, allreduce) -> dict:
        """The calibration losses along μ (all ranks' tokens and questions): mean NLL per reference token,
        and the multiple-choice loss per choice set when ``choice_nll`` was solved (its cache is there)."""
        mus = strength_grid(mu, exact)
        token = allreduce(torch.tensor([*(result.cache.loss_grad_hess(m)[0] for m in mus), result.cache.count],
                                       dtype=torch.float64, device="cpu"))
        curve = {"mu": mus, "token_nll": (token[:-1] / token[-1].clamp_min(1)).tolist(), "strength": mu}
        if self.strength == "choice_nll":
            cache = calibration.choices.cache
            sets = torch.tensor([cache.usable_groups()], dtype=torch.float64, device="cpu")
            choice = allreduce(torch.cat([cache.losses(mus), sets]))
            curve["choice_loss"] = (choice[:-1] / choice[-1].clamp_min(1)).tolist()
        return curve

    def _write(self, trainer, pl_module) -> None:
        """Hand the run to the module (``fit`` writes it after the adapter, at the end); a μ̄
        re-solved in validate/test is written now, with a copy of the adapter, as a run of its own."""
        h = pl_module.hparams
        sol = self.solution
        pl_module.steering_state.run = SteeringRun(
            model=h.model, adapter=h.adapter, steering=SteeringConfig.from_dict(sol["steering"]),
            adapter_options=h.adapter_options, tokenizer_sha256=tokenizer_hash(pl_module.tokenizer),
            aggregates=sol["aggregates"], diagnostics=sol["diagnostics"],
            calibration_seconds=sol["calibration_seconds"], global_step=sol["global_step"], hparams=dict(h),
            datasets=datasets_of(trainer.datamodule),
        )
        if trainer.state.fn == "fit":
            return
        adapter_state = full_adapter_state(pl_module.model)  # sharded: gathered on every rank (a collective)
        writer = run_writer(trainer)
        if writer is not None:  # this command's own new run, never the run μ̄ was re-solved from
            writer.write_run(pl_module.model, pl_module.steering_state.run, pl_module.tokenizer, adapter_state=adapter_state)
            say(f"the re-solved μ̄ is part of the new run {writer.target.resolve()}")

    def _needs_solve(self, trainer, pl_module) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == "fit":
            return self.solution is None or self.solution["global_step"] != trainer.global_step
        return pl_module.mu is None  # validate/test reuse a loaded μ̄

    def on_validation_start(self, trainer, pl_module):
        if self._needs_solve(trainer, pl_module):
            self.solve(trainer, pl_module)

    on_test_start = on_validation_start

    def on_train_epoch_end(self, trainer, pl_module):
        if self._needs_solve(trainer, pl_module):
            self.solve(trainer, pl_module)

    def state_dict(self):
        return {"solution": self.solution}

    def load_state_dict(self, state_dict):
        self.solution = state_dict.get("solution")


class ContrastiveBaseline(L.Callback):
    """Score the contrastive baseline ``z_φ + γ(z_φ − z_θ)`` next to SVDecode, with γ fit on calibration data.

    γ minimises the calibration questions' multiple-choice loss (the ``choice_nll`` objective, with
    the contrastive scores) over ``gammas``, exactly at each point, on the DataModule's
    ``calib_choice_dataloader()`` (the calibration pass μ̄ is solved on) before the module scores
    with new weights. The
    baseline is the logit-difference direction with no mask
    (:func:`svd_lightning.steering.contrastive_log_probs`): same two distributions, same decode cost.
    The module then scores a ``contrastive`` variant: in the tables, metrics, per-question files
    and paired CIs, and ``γ`` is logged as ``steer/contrastive_gamma``.

    Args:
        gammas: the grid γ is chosen on (default :data:`svd_lightning.steering.GAMMA_GRID`, 0 = warm start).
        limit_batches: use only the first k calibration batches (one value for every solver: one pass).
    """

    def __init__(self, gammas: list[float] | None = None, limit_batches: int | None = None):
        self.gammas = [float(g) for g in (GAMMA_GRID if gammas is None else gammas)]
        if len(self.gammas) < 2 or not all(math.isfinite(g) for g in self.gammas):
            raise ValueError(f"gammas needs at least 2 finite values, got {gammas}")
        self.limit_batches = limit_batches
        self.solution: dict | None = None

    @property
    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(grids={"contrastive": tuple(self.gammas)}, limit_batches=self.limit_batches)

    def setup(self, trainer, pl_module, stage):
        if stage != "predict":
            if len(choice_calibration_loader(trainer, self.needs)) == 0:
                raise ValueError("ContrastiveBaseline: calib_choice_dataloader() yields no batches")
            pl_module.steering_state.needs.add(self.needs, type(self).__name__)

    def solve(self, trainer, pl_module) -> float:
        result = calibration_pass(trainer, pl_module, self.needs, type(self).__name__).grids["contrastive"]
        gamma = result.best()
        pl_module.set_contrastive_gamma(gamma)
        writer = run_writer(trainer)
        if writer is not None and writer.run is not None:  # the run of these weights, still being built
            writer.update_steering(gamma=gamma)
        self.solution = {"gamma": gamma, "losses": dict(zip(map(str, result.mus), result.losses.tolist())),
                         "diagnostics": result.diagnostics, "seconds": result.seconds, "global_step": trainer.global_step}
        pl_module.steering_state.contrastive = self.solution
        log_steering(trainer, pl_module, "steer/contrastive_gamma", gamma)
        edge = " -- at the grid's edge: the loss may keep falling beyond it (pass wider `gammas`)" if result.at_edge() else ""
        rank_zero_info(f"contrastive baseline γ = {gamma:+g} (calib multiple-choice loss, best of "
                       f"{len(self.gammas)} grid points){edge}")
        return gamma

    def _maybe_solve(self, trainer, pl_module):
        # New weights (another step) or no γ yet: re-fit; validate/test after fit reuse the last one.
        if trainer.sanity_checking:
            return
        if self.solution is None or self.solution["global_step"] != trainer.global_step or pl_module.gamma is None:
            self.solve(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._maybe_solve(trainer, pl_module)

    on_test_start = on_validation_start

    def state_dict(self):
        return {"solution": self.solution}

    def load_state_dict(self, state_dict):
        self.solution = state_dict.get("solution")


Weights = Literal["best", "last"]


def monitoring_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ``ModelCheckpoint`` that ranks checkpoints by a monitored metric, if the trainer has one."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


class CheckpointWeights(L.Callback):
    """Which warm-start weights a fit's run is calibrated on, written with and tested: ``best`` (the
    default) takes the best checkpoint of a ``ModelCheckpoint`` that monitors a metric -- what
    ``trainer.test(ckpt_path="best")`` would score -- and the last weights where there is none (or it
    saved nothing); ``last`` always takes the last (e.g. after EarlyStopping's patience ran out).

    At the end of ``fit`` it loads that checkpoint's weights into the module and solves μ̄ (and γ) on them
    again (one calibration pass: the run's record is the calibration of those weights), before the module
    writes the run. ``steering.json`` records the choice under ``weights``.
    """

    def __init__(self, weights: Weights = "best"):
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
        self.weights = weights
        self.chosen: dict = {"from": "last"}

    def on_train_end(self, trainer, pl_module):  # before the module's on_train_end writes the run
        checkpoint = monitoring_checkpoint(trainer)
        self.chosen = {"from": "last", "global_step": trainer.global_step}
        best = checkpoint.best_model_path if checkpoint is not None and self.weights == "best" else ""
        if best:
            saved = trainer.strategy.load_checkpoint(best)
            self.chosen = {"from": "best", "checkpoint": Path(best).name, "monitor": checkpoint.monitor,
                           "mode": checkpoint.mode, "score": float(checkpoint.best_model_score),
                           "global_step": int(saved["global_step"])}
            if self.chosen["global_step"] != trainer.global_step:
                trainer.strategy.load_model_state_dict(saved)
                rank_zero_info(f"the run takes the best checkpoint's weights ({checkpoint.monitor} = "
                               f"{self.chosen['score']:.4f}, step {self.chosen['global_step']} of {trainer.global_step}; "
                               "weights: last keeps the last)")
                self._solve_again(trainer, pl_module)
        state = pl_module.steering_state
        if state.run is not None:
            state.run = dataclasses.replace(state.run, weights=dict(self.chosen),
                                            global_step=self.chosen["global_step"])

    @staticmethod
    def _solve_again(trainer, pl_module) -> None:
        state = pl_module.steering_state
        state.calibration, state.run, state.contrastive, state.fit_ended = None, None, None, True
        pl_module.steering_strength.fill_(float("nan"))
        pl_module.contrastive_gamma.fill_(float("nan"))
        for kind in (StrengthSolver, ContrastiveBaseline):  # μ̄, then γ, as validation solves them
            for solver in (c for c in trainer.callbacks if isinstance(c, kind)):
                solver.solve(trainer, pl_module)

    def state_dict(self):
        return {"chosen": self.chosen}


class StageTimes(L.Callback):
    """Wall-clock seconds of every stage of a command, written to the run as ``timings.json``.

    Put it first among the callbacks (the CLI does): its ``on_validation_start`` / ``on_test_start``
    then run before the strength solvers, so the time from there to the first scored batch is the
    calibration (the one pass, μ̄ and the contrastive γ), and the rest of the loop is scoring. ``origin``: when the
    command started (default: when this callback was built), so that set-up (model and data
    loading) is counted too; ``other`` is what no stage accounts for.
    """

    def __init__(self, origin: float | None = None):
        self.origin = time.perf_counter() if origin is None else origin
        self.stages: dict[str, float] = {}
        self._marks: dict[str, float] = {}
        self._started = False

    def _add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def _mark(self, key: str) -> None:
        now = time.perf_counter()
        if not self._started:  # the first work of the command ends its set-up
            self._started = True
            self._add("set-up", now - self.origin)
        self._marks[key] = now

    def _since(self, key: str) -> float:
        return time.perf_counter() - self._marks.pop(key, time.perf_counter())

    # warm start: the training batches themselves (forward, backward, optimizer step)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add("warm start", self._since("batch"))

    def on_train_epoch_end(self, trainer, pl_module):  # solvers run here when no validation did
        self._mark("epoch end")

    def on_train_end(self, trainer, pl_module):
        self._add("calibration", self._since("epoch end"))
        self._mark("run")

    def _loop_start(self, trainer, pl_module, stage):
        if not trainer.sanity_checking:
            self._mark(stage)

    def _first_batch(self, trainer, pl_module, stage, batch_idx, dataloader_idx):
        if not trainer.sanity_checking and batch_idx == 0 and dataloader_idx == 0 and stage in self._marks:
            self._add("calibration", self._since(stage))  # the one pass and every solve before scoring
            self._mark(f"{stage} scoring")

    def _loop_end(self, trainer, stage):
        if not trainer.sanity_checking and f"{stage} scoring" in self._marks:
            self._add(f"{stage} scoring", self._since(f"{stage} scoring"))
        self._marks.pop(stage, None)

    def on_validation_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "validation")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "validation", batch_idx, dataloader_idx)

    def on_validation_end(self, trainer, pl_module):
        self._loop_end(trainer, "validation")

    def on_test_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "test", batch_idx, dataloader_idx)

    def on_test_end(self, trainer, pl_module):
        self._loop_end(trainer, "test")

    def on_predict_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "predict")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "predict", batch_idx, dataloader_idx)

    def on_predict_end(self, trainer, pl_module):
        self._loop_end(trainer, "predict")

    def teardown(self, trainer, pl_module, stage):
        if "run" in self._marks:  # the adapter and steering.json, written at the end of fit
            self._add("run writing", self._since("run"))
        writer = run_writer(trainer)
        if writer is not None and writer.committed is None:
            writer.write_json(TIMINGS_FILE, self.record())

    def record(self) -> dict:
        total = time.perf_counter() - self.origin
        return {"seconds": dict(self.stages), "other": total - sum(self.stages.values()), "total": total}

    def table(self) -> str:
        rec = self.record()
        rows = [*rec["seconds"].items(), ("other", rec["other"]), ("total", rec["total"])]
        return "\n".join(f"{name:<28}{seconds:>9.1f} s" for name, seconds in rows)


TIMINGS_FILE = "timings.json"
CALIBRATION_CURVE_FILE = "calibration_curve.json"  # the losses calibration.png draws


class SteeredValidation(L.Callback):
    """Print plain (warm) / base / steered metrics side by side and write ``metrics.json``."""

    def __init__(self, print_table: bool = True):
        self.print_table = print_table
        self.history: list[dict] = []

    def _report(self, trainer, pl_module, stage: str) -> None:
        state = pl_module.steering_state
        metrics = dict(state.metrics)
        if trainer.sanity_checking or not metrics:
            return
        self.history.append({"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        writer = run_writer(trainer)
        if writer is None:  # not global rank zero
            return
        paired = paired_gains(state.per_question, pl_module.metric_family)
        if paired:
            self.history[-1]["paired_bootstrap"] = paired
        if self.print_table:
            split = "the val split (not the questions μ̄ was solved on)" if stage == "val" else "the test split"
            print(f"{'validation' if stage == 'val' else 'test'} on {split} (step {trainer.global_step}):")
            print(format_table(metrics, stage))
            for line in format_paired(paired):
                print(line)
        writer.write_json(METRICS_FILE, {"history": self.history})
        if state.per_question:
            writer.write_json(f"{stage}_per_question.json", state.per_question)
            png = questions_figure(state.per_question, pl_module.metric_family, stage, pl_module.mu)
            if png is not None:
                writer.write_bytes(questions_figure_name(stage), png)

    def on_validation_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test")

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state_dict):
        self.history = list(state_dict.get("history", []))


STEERED = {k: VARIANT_LABELS[k] for k in ("steered", "contrastive")}  # the decode-time methods
REFERENCES = {k: VARIANT_LABELS[k] for k in ("plain", "base")}


def paired_gains(per_question: dict, family: str) -> dict:
    """Each steered method minus warm and minus pre-trained, per headline metric: mean and 95% paired
    bootstrap CI over questions, keyed ``<metric>_<method>_minus_<reference>``."""
    out = {}
    for method in (v for v in STEERED if v in per_question):
        for other in REFERENCES:
            for m in HEADLINE_METRICS[family]:
                diff = (torch.tensor(per_question[method][m], dtype=torch.float64, device="cpu")
                        - torch.tensor(per_question[other][m], dtype=torch.float64, device="cpu"))
                out[f"{m}_{method}_minus_{other}"] = dict(
                    zip(("mean", "ci_low", "ci_high"), paired_bootstrap(diff)),
                    metric=m, method=method, reference=other, questions=int(diff.numel()),
                )
    return out


def format_paired(paired: dict) -> list[str]:
    return [f"{g['metric']:<6} {STEERED[g['method']]:<12} − {REFERENCES[g['reference']]:<11} {100 * g['mean']:+6.2f} "
            f"[{100 * g['ci_low']:+.2f}, {100 * g['ci_high']:+.2f}] (95% paired bootstrap over {g['questions']} questions, one run)"
            for g in paired.values()]


def format_table(metrics: dict[str, float], stage: str) -> str:
    """Rows: metrics; columns: pre-trained (base), warm start (plain), +SVDecode (steered), and
    +contrastive when it was scored."""
    table = variant_table(metrics, stage)
    names = sorted({n for values in table.values() for n in values})
    lines = [f"{'metric':<14}" + "".join(f"{VARIANT_LABELS[v]:>13}" for v in table)]
    for n in names:
        cells = "".join(f"{100 * values[n]:>13.2f}" if n in values else f"{'-':>13}" for values in table.values())
        lines.append(f"{n:<14}{cells}")
    if f"{stage}/mu" in metrics:
        lines.append(f"μ̄ = {metrics[f'{stage}/mu']:+.4f}")
    if f"{stage}/gamma" in metrics:
        lines.append(f"contrastive γ = {metrics[f'{stage}/gamma']:+g}")
    return "\n".join(lines)


class LogitSnapshot(L.Callback):
    """Top-k pre-trained (adapter off, at fit start) and warm-started (each epoch end) log-probs of
    the first calibration batch, saved to ``logit_snapshots.pt`` for inspection and plots."""

    def __init__(self, top_k: int = 20, max_positions: int = 64):
        self.top_k, self.max_positions = top_k, max_positions
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def _snapshot(self, trainer, pl_module, name: str) -> None:
        batch = next(iter(calibration_loader(trainer)))
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        with lockstep(pl_module.model):
            warm, base, labels, _ = paired_label_logits(pl_module.model, batch)
        pl_module.train(was_training)
        k = min(self.top_k, warm.shape[-1])
        lp = {"base": torch.log_softmax(base.float(), -1), name: torch.log_softmax(warm.float(), -1)}
        for key, v in lp.items():
            top = v[: self.max_positions].topk(k, dim=-1)
            self.snapshots.setdefault(key, {"values": top.values.cpu(), "indices": top.indices.cpu(), "labels": labels[: self.max_positions].cpu()})
        writer = run_writer(trainer)
        if writer is not None:
            writer.save_torch("logit_snapshots.pt", self.snapshots)

    def on_fit_start(self, trainer, pl_module):
        self._snapshot(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module):
        self._snapshot(trainer, pl_module, f"warm_epoch{trainer.current_epoch}")


PREDICTIONS_FILE = "predictions.jsonl"


def with_text(row: dict, example) -> dict:
    """A question's prediction row with what a reader needs: the prompt, each choice's text, and each
    variant's pick (the best-scored choice of the first choice set: MC1's for TruthfulQA)."""
    if example is not None:
        row = {"question_index": row["question_index"], "prompt": example.prompt, "choices": [
            {**c, "text": example.choices[c["choice_index"]]} for c in row["choices"]]}
    first = min(c.get("choice_set", 0) for c in row["choices"])
    candidates = [c for c in row["choices"] if c.get("choice_set", 0) == first]
    picks = {}
    for variant in (v for v in VARIANT_LABELS if all(v in c for c in candidates)):
        best = max(candidates, key=lambda c: (c[variant], -c["choice_index"]))  # ties: the first choice
        picks[variant] = {"choice_index": best["choice_index"], **({"text": best["text"]} if "text" in best else {}),
                          "is_true": best.get("is_true")}
    return {**row, "picks": picks}


class ScoreWriter(BasePredictionWriter):
    """``predict``: one JSON line per question: its prompt, every choice's text and plain / base / steered
    (/ contrastive) log-likelihood, and each variant's pick (:func:`with_text`).

    Args:
        out: the JSONL file (default: ``predictions.jsonl`` in the run). It is written once, whole, at
            the end: a crash leaves the previous file, never half of one.
    """

    def __init__(self, out: str | None = None):
        super().__init__(write_interval="batch")
        self.out = out
        self.rows: dict[int, dict] = {}

    def on_predict_start(self, trainer, pl_module):
        self.rows = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        columns = {k: v.tolist() for k, v in prediction.items() if isinstance(v, torch.Tensor)}
        for i, q in enumerate(columns["question_index"]):
            row = self.rows.setdefault(q, {"question_index": q, "choices": []})
            row["choices"].append({k: columns[k][i] for k in columns if k not in ("question_index",)})

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "predict" and trainer.world_size > 1:
            raise NotImplementedError("ScoreWriter writes from one process; run predict with devices=1")
        if self.out and Path(self.out).is_dir():  # fail now, not after scoring every question
            raise IsADirectoryError(f"ScoreWriter(out={self.out!r}) is a directory; give a .jsonl file name")

    def on_predict_end(self, trainer, pl_module):
        examples = {ex.index: ex for ex in getattr(trainer.datamodule, "test_set", None) or []}
        rows = [with_text(row, examples.get(q)) for q, row in sorted(self.rows.items())]
        text = "".join(json.dumps({**row, "mu": pl_module.mu}) + "\n" for row in rows)
        writer = run_writer(trainer)
        if self.out:  # the user's own file, outside the run
            path = atomic_write_text(self.out, text)
        elif writer is not None:
            writer.write_text(PREDICTIONS_FILE, text)
            path = writer.target / PREDICTIONS_FILE
        else:
            return
        say(f"wrote {len(self.rows)} questions' scores to {path.resolve()}")
