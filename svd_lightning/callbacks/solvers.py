"""The callbacks that solve: steering vectors and their statistics, μ̄, and the contrastive baseline's γ."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from svd_lightning.calibration import CalibrationNeeds, CalibrationPass, CalibrationResult
from svd_lightning.callbacks.calibration import (calibration_pass, check_calibration_set, choice_calibration_loader,
                                                 log_steering)
from svd_lightning.config import (CURVATURES, SOLVED_STRENGTHS, Curvature, SolvedStrength, SolverSettings,
                                  SteeringConfig)
from svd_lightning.data.protocol import datasets_of
from svd_lightning.figures import CALIBRATION_FIGURE, calibration_figure, strength_grid
from svd_lightning.log import say
from svd_lightning.logger import run_writer
from svd_lightning.run import SteeringRun, tokenizer_hash
from svd_lightning.sharding import full_adapter_state
from svd_lightning.steering import GAMMA_GRID


CALIBRATION_CURVE_FILE = "calibration_curve.json"  # the losses calibration.png draws


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
        solver = SolverSettings(self.strength, self.curvature, self.trim)
        key = solver.key
        mu = summary[key]
        if not math.isfinite(mu):
            raise FloatingPointError(f"the {key} strength is not finite ({mu}); see steer/* logs")
        pl_module.set_strength(mu)
        curve = self.curve(result, calibration, mu, summary["exact"], allreduce)
        self.solution = {
            "steering": pl_module.steering_config.to_dict(),
            "solver": solver.to_dict(),
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
            solver=SolverSettings.from_dict(sol["solver"]), contrastive_gamma=pl_module.gamma,
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
            writer.update_run(contrastive_gamma=gamma)
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
