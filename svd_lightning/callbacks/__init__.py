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

One module per concept: :mod:`~svd_lightning.callbacks.calibration` (the shared pass and its loaders),
:mod:`~svd_lightning.callbacks.solvers`, :mod:`~svd_lightning.callbacks.weights` (:class:`CheckpointWeights`),
:mod:`~svd_lightning.callbacks.report`, :mod:`~svd_lightning.callbacks.timing` (:class:`StageTimes`),
:mod:`~svd_lightning.callbacks.outputs` and :mod:`~svd_lightning.callbacks.progress` (:class:`LogProgressBar`).

Every solver declares what it needs in ``setup``; :func:`calibration_pass` then runs *one* pass over
the calibration questions per warm-start state for all of them (``steer/calibration_passes``).

Lightning validates *before* ``on_train_epoch_end``, so extraction and solving also run at
``on_validation_start`` whenever the weights changed since the last solve: the steered
validation of epoch k always uses the μ̄ of epoch k. No nested Trainer is started.
"""

from svd_lightning.callbacks.calibration import calibration_pass
from svd_lightning.callbacks.outputs import PREDICTIONS_FILE, LogitSnapshot, ScoreWriter, with_text
from svd_lightning.callbacks.progress import LogProgressBar
from svd_lightning.callbacks.report import SteeredValidation, format_paired, format_table, paired_gains
from svd_lightning.callbacks.solvers import CALIBRATION_CURVE_FILE, ContrastiveBaseline, SteeringExtraction, StrengthSolver
from svd_lightning.callbacks.timing import StageTimes
from svd_lightning.run import TIMINGS_FILE
from svd_lightning.callbacks.weights import CheckpointWeights, Weights, monitoring_checkpoint

__all__ = [
    "CALIBRATION_CURVE_FILE", "PREDICTIONS_FILE", "TIMINGS_FILE", "CheckpointWeights", "ContrastiveBaseline",
    "LogProgressBar", "LogitSnapshot", "ScoreWriter", "StageTimes", "SteeredValidation", "SteeringExtraction", "StrengthSolver", "Weights",
    "calibration_pass", "format_paired", "format_table", "monitoring_checkpoint", "paired_gains", "with_text",
]
