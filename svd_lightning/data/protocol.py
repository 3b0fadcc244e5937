"""What the steering callbacks need of a DataModule: one Protocol, checked once where a fit starts.

Any ``LightningDataModule`` works that has, beside Lightning's ``train_dataloader`` (the warm start):

* ``calib_dataloader()``: the calibration questions as teacher-forced prompt + reference-answer batches
  (``svd_lightning.batch.collate_lm``): μ̄'s token statistics;
* ``calib_choice_dataloader()``: the same questions as choice batches (``collate_choices``), for whatever
  scores the calibration choices: ``strength: choice_nll`` and the contrastive baseline's γ
  (``contrastive_baseline: false`` skips it);
* ``val_dataloader()`` / ``test_dataloader()``: choice batches, for steered validation and test scoring.

:class:`~svd_lightning.data.ChoiceDataModule` and its subclasses have all of them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from svd_lightning.log import InputError


@runtime_checkable
class SteeringDataModule(Protocol):
    def train_dataloader(self): ...

    def calib_dataloader(self): ...

    def calib_choice_dataloader(self): ...


def datasets_of(datamodule) -> list[str]:
    """The Hub datasets a DataModule says its questions came from (``datasets()``; none when it does not say)."""
    said = getattr(datamodule, "datasets", None)
    return list(said()) if callable(said) else []


def check_datamodule(datamodule, choices_for: str | None) -> None:
    """Raise an :class:`InputError` naming every method ``datamodule`` lacks for this fit; ``choices_for``
    names what needs the calibration choice batches (None: nothing does)."""
    needed = {"calib_dataloader": "μ̄'s token statistics"}
    if choices_for:
        needed["calib_choice_dataloader"] = choices_for
    if datamodule is None:
        raise InputError("the steering callbacks need a DataModule (svd_lightning.data.SteeringDataModule); got none")
    missing = {name: why for name, why in needed.items() if not callable(getattr(datamodule, name, None))}
    if missing:
        listed = "; ".join(f"{name}() for {why}" for name, why in missing.items())
        raise InputError(f"{type(datamodule).__name__} lacks {listed}. The steering callbacks need "
                         "svd_lightning.data.SteeringDataModule (its docstring says what each yields; "
                         "svd_lightning.data.ChoiceDataModule has all of them)")
