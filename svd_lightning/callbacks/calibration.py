"""The one calibration pass of the current weights, shared by every solver, and the loaders it reads."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import lightning as L
import torch

from svd_lightning.calibration import CalibrationNeeds, CalibrationPass, calibrate_pass
from svd_lightning.data.protocol import check_datamodule
from svd_lightning.log import say


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
        step=trainer.global_step, prefixes=pl_module.prefixes, forward_mode=pl_module.hparams.forward_mode,
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
