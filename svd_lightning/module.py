"""The LightningModule: warm-start PEFT fine-tuning and plain / base / steered multiple-choice scoring."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from svd_lightning.batch import validate_choice_batch
from svd_lightning.calibration import CalibrationNeeds, CalibrationPass
from svd_lightning.data.protocol import datasets_of
from svd_lightning.config import (Direction, ForwardMode, ScoringPolicy, SolverSettings, SteeringConfig,
                                  check_forward_mode, check_strength)
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.log import say
from svd_lightning.scoring import score_choices
from svd_lightning.metrics import MultipleChoiceScores
from svd_lightning.logger import check_loggers, finish_run, run_writer, start_run
from svd_lightning.models import ADAPTER_METHODS, apply_adapter, load_causal_lm, load_tokenizer, portable_base
from svd_lightning.run import SteeringRun, attach_adapter, load_base, resolve_settings, tokenizer_hash
import svd_lightning.strategies  # noqa: F401  (registers --trainer.strategy fsdp2)
from svd_lightning.sharding import full_adapter_state, is_sharded, lockstep, shard_model

VARIANTS = ("plain", "base", "steered", "contrastive")  # contrastive: once a γ is set (ContrastiveBaseline)


@dataclass
class SteeringState:
    """What the steering callbacks and the module hand each other: one typed object, ``module.steering_state``.

    Each callback reads what it needs here instead of looking for another callback or setting
    attributes on the module for it; μ̄ and γ themselves are the module's buffers (checkpointed).
    """

    needs: CalibrationNeeds = field(default_factory=CalibrationNeeds)  # what the solvers declared (at setup)
    calibration: CalibrationPass | None = None  # the one pass of the current weights (.step says which)
    calibration_passes: int = 0  # passes run by this module so far (logged as steer/calibration_passes)
    run: SteeringRun | None = None  # the record of the solved μ̄, written with the adapter at the end of fit
    contrastive: dict | None = None  # ContrastiveBaseline's last γ solution (γ, losses, seconds, step)
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation / test epoch's metrics
    per_question: dict[str, dict[str, list]] = field(default_factory=dict)  # ... and every question's scores
    fit_ended: bool = False  # past the fit's last epoch (CheckpointWeights): no more self.log


    def calibration_at(self, step: int, needs: CalibrationNeeds | None = None) -> CalibrationPass | None:
        """The pass over the weights after warm-start step ``step`` (with all of ``needs``), or None."""
        known = self.calibration
        if known is None or known.step != step or (needs is not None and not known.needs.covers(needs)):
            return None
        return known


class SteeringLM(L.LightningModule):
    """Any Hugging Face causal LM + a peft adapter, warm-started on a task and steered at decode time.

    Args:
        model: hub id, local folder, ``.gguf`` file, ``smollm2-135m`` or ``tiny-random`` (default).
        adapter: peft method: lora (default), ia3, prompt_tuning, p_tuning (prompt encoder) or prefix_tuning.
        adapter_options: overrides of the paper's defaults for that method (e.g. ``{r: 16}``).
        learning_rate: AdamW learning rate of the warm start (paper: 5e-5).
        alpha: confidence-mask threshold α: keep tokens with p_φ ≥ α·max p_φ (default 0.1).
        scoring_policy: what a masked label token contributes to teacher-forced scores (see
            :func:`svd_lightning.steering.steered_log_probs`; default ``mask_generation_only``).
        floor: the log-prob of a masked label token under ``scoring_policy=floor`` (default −20).
        direction: the steering vector μ̄ scales: ``kl_gradient`` (SVDecode's δz, default) or
            ``logit_difference`` (``z_φ − z_θ``, the contrastive / proxy-tuning direction; a useful μ̄
            is then usually positive). See :func:`svd_lightning.steering.steering_direction`.
        mu: a fixed μ̄; leaves the strength solver nothing to do (``--solver.strength`` names the solver).
        strength: the former name of ``mu`` (configs and checkpoints that used it still load; a warning says so).
        run_dir: a finished run directory (:mod:`svd_lightning.run`): load its adapter and μ̄
            instead of training from scratch. Model, adapter, α, policy, floor and direction then
            come from the run; setting one to another value is an error, except α / policy / floor /
            direction with ``reuse_strength=False``, which re-solves μ̄ for them.
        reuse_strength: with ``run_dir``, take its μ̄; ``False`` re-solves μ̄ (e.g. with another
            strength option or α) on the calibration set during ``validate`` / ``test``.
        seed: seed of the adapter's initialisation.
        forward_mode: how warm and pre-trained distributions are computed for calibration and
            scoring: ``auto`` (one forward pass for both where the adapter allows it, i.e. LoRA;
            the choice is logged), ``one_forward`` or ``two_pass`` (see :mod:`svd_lightning.forward.rows`).
    """

    def __init__(
        self,
        model: str | None = None,
        adapter: Literal["lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"] | None = None,
        adapter_options: dict[str, Any] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        alpha: float | None = None,
        scoring_policy: ScoringPolicy | None = None,
        floor: float | None = None,
        direction: Direction | None = None,
        mu: float | None = None,
        run_dir: str | None = None,
        reuse_strength: bool = True,
        seed: int = 0,
        forward_mode: ForwardMode = "auto",
        strength: float | None = None,
    ):
        super().__init__()
        if strength is not None:  # a fixed μ̄ under its former name (a config or checkpoint written before)
            if mu is not None and mu != strength:
                raise ValueError(f"SteeringLM: mu={mu} and strength={strength} (its former name) disagree; give mu only")
            warnings.warn("SteeringLM(strength=...) is now SteeringLM(mu=...) (--model.mu); strength names the "
                          "solver (--solver.strength)", DeprecationWarning, stacklevel=2)
            mu, strength = strength, None  # recorded (hparams, config.yaml) under its name now
        self.save_hyperparameters()
        given = {"model": model, "adapter": adapter, "alpha": alpha, "scoring_policy": scoring_policy, "floor": floor,
                 "direction": direction}
        self.source_run = SteeringRun.load(run_dir) if run_dir is not None else None
        settings = resolve_settings(given, self.source_run, run_dir, reuse_strength)
        self.hparams.update(settings)  # what was used, for config.yaml, checkpoints and the run file
        model, adapter, alpha = settings["model"], settings["adapter"], settings["alpha"]
        if adapter not in ADAPTER_METHODS:
            raise ValueError(f"unknown adapter {adapter!r}; choose one of {ADAPTER_METHODS}")
        # Every setting is checked here once, by the one config they all end up in.
        SteeringConfig.from_dict({k: settings[k] for k in ("alpha", "scoring_policy", "floor", "direction")}
                                 | {"mu": mu}, where="SteeringLM")
        check_forward_mode(forward_mode, "SteeringLM")
        self.steering_state = SteeringState()
        self._announced = None  # the run whose path was last printed
        if run_dir is not None:
            say(f"reading run {Path(run_dir).resolve()}")
            self.tokenizer, base = load_base(self.source_run, run_dir, base_model=given["model"])  # the user's
            self.model = attach_adapter(base, self.source_run, run_dir, is_trainable=True)
        else:
            self.tokenizer = load_tokenizer(model)
            base = load_causal_lm(model)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.model = apply_adapter(base, adapter, **(adapter_options or {}))
        # Loaders return eval-mode models; Lightning keeps submodule modes, so switch explicitly
        # (otherwise the adapter's dropout would silently be off during the warm start).
        self.model.train()
        self.prefixes = PrefixCache()  # the split's shared primer, encoded once per weights for every stage
        # μ̄ lives in a buffer so Lightning checkpoints carry it; NaN means "not solved yet".
        self.register_buffer("steering_strength", torch.tensor(float("nan"), dtype=torch.float64, device="cpu"))
        # The contrastive baseline's γ (callbacks.ContrastiveBaseline), scored next to SVDecode; NaN: none.
        self.register_buffer("contrastive_gamma", torch.tensor(float("nan"), dtype=torch.float64, device="cpu"))
        if mu is not None:
            self.set_strength(mu)
        elif run_dir is not None and reuse_strength:
            self.set_strength(self.source_run.steering.mu)
        self.metrics = self.build_metrics("choice")  # setup() switches to the DataModule's family

    @staticmethod
    def build_metrics(family: str) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict(
            {f"{stage}_{v}": MultipleChoiceScores(family) for stage in ("val", "test") for v in VARIANTS}
        )

    @property
    def metric_family(self) -> str:
        return self.metrics["test_plain"].family

    # -- strength ------------------------------------------------------------------------------
    @property
    def mu(self) -> float | None:
        value = float(self.steering_strength)
        return None if math.isnan(value) else value

    def set_strength(self, mu: float) -> None:
        check_strength(mu, "mu", "steering strength")
        self.steering_strength.fill_(float(mu))

    @property
    def gamma(self) -> float | None:
        value = float(self.contrastive_gamma)
        return None if math.isnan(value) else value

    def set_contrastive_gamma(self, gamma: float) -> None:
        check_strength(gamma, "gamma", "contrastive baseline")
        self.contrastive_gamma.fill_(float(gamma))

    @property
    def steering_config(self) -> SteeringConfig:
        """The decode settings the module scores with, with its current μ̄ (None before it is solved)."""
        h = self.hparams
        return SteeringConfig(mu=self.mu, alpha=h.alpha, scoring_policy=h.scoring_policy, floor=h.floor,
                              direction=h.direction)

    # -- sharding ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``--trainer.strategy fsdp2``): shard the model with FSDP2
        over the data-parallel mesh (:mod:`svd_lightning.sharding`); other strategies: nothing to do."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"SteeringLM shards data-parallel only (FSDP2), but the device mesh has tensor_parallel_size="
                             f"{mesh['tensor_parallel'].size()}: use --trainer.strategy fsdp2 (svd_lightning.sharding."
                             "FSDP2Strategy), or ModelParallelStrategy with tensor_parallel_size=1")
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in names else mesh)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite warm-start loss at step {self.global_step}")
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # -- scoring -------------------------------------------------------------------------------
    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        """The batch's scores, in fp32 whatever the warm start's precision (as calibration is).

        A steered score adds μ·δ, δ a difference of two almost equal distributions, and μ̄ is
        large (tens to hundreds): bf16 logits' rounding moves it by nats. Measured on SmolLM2 at
        μ = -241, two exact layouts of one bf16 forward differed by up to 30 nats per choice,
        and bf16 vs fp32 by a median of 5; contrastive (γ = 5) by 0.7.
        """
        validate_choice_batch(batch)
        with torch.autocast(self.device.type, enabled=False), lockstep(self.model):
            return score_choices(self.model, batch, self.steering_config, gamma=self.gamma,
                                 forward_mode=self.hparams.forward_mode, prefixes=self.prefixes)

    def _eval_step(self, stage: str, batch, batch_idx: int) -> None:
        try:
            scores = self.score_batch(batch)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} -- {stage} batch {batch_idx}, after warm-start step {self.global_step}") from err
        for v in VARIANTS:
            if v in scores:
                self.metrics[f"{stage}_{v}"].update(batch, scores[v])

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[str, float] = {}
        per_question: dict[str, dict[str, list]] = {}
        for v in VARIANTS:
            metric = self.metrics[f"{stage}_{v}"]
            if metric.update_count == 0:
                continue
            for name, value in metric.compute().items():
                results[f"{stage}/{name}_{v}"] = float(value)
            per_question[v] = {k: t.tolist() for k, t in metric.per_question().items()}
            metric.reset()
        self.steering_state.per_question = per_question  # SteeredValidation: paired CIs and the per-question file
        if self.mu is not None:
            results[f"{stage}/mu"] = self.mu
        if "contrastive" in per_question:
            results[f"{stage}/gamma"] = self.gamma
        # torchmetrics synced the values already: every rank logs the same ones, and sync_dist=True (a mean
        # of equal values) is how Lightning is told an epoch-level metric holds for all ranks.
        self.log_dict(results, sync_dist=True)
        self.steering_state.metrics = results

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._eval_epoch_end("val")
        else:
            for m in self.metrics.values():
                m.reset()

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch, batch_idx)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        """Per-row scores (plain, base, steered, contrastive once γ is set) with the batch's question/choice ids."""
        scores = self.score_batch(batch)
        keys = ("question_index", "choice_set", "choice_index", "is_true")
        return {**{k: batch[k] for k in keys}, **scores}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The dropout stream: with it (and the train loader's state) a run resumed mid-warm-start
        # takes exactly the steps of an uninterrupted one, so it ends with the same μ̄.
        checkpoint["svd_lightning_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the contrastive baseline existed have no γ: none solved yet.
        checkpoint.get("state_dict", {}).setdefault("contrastive_gamma", torch.tensor(float("nan"), dtype=torch.float64, device="cpu"))
        state = checkpoint.get("svd_lightning_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])

    def prepare_data(self) -> None:
        # Before Lightning creates its loggers' experiments (which replace a version directory's old logs).
        check_loggers(self.trainer)

    def setup(self, stage: str) -> None:
        self.steering_state.fit_ended = False
        # The task declares how it is scored (a DataModule's `metric`; plain loaders: acc / acc_norm).
        family = getattr(self.trainer.datamodule, "metric", "choice")
        if family != self.metric_family:
            self.metrics = self.build_metrics(family)
        # Every stage writes a run of its own (svd_lightning.logger): a finished run is never written into.
        writer = start_run(self.trainer)
        if writer is not None and writer is not self._announced:
            self._announced = writer
            until = "the command" if writer.hold else f"the {getattr(stage, 'value', stage)}"
            say(f"writing run {writer.target.resolve()} (built in {writer.path.name}, moved into place when "
                f"{until} is done)")
        connector = getattr(self.trainer, "_accelerator_connector", None)  # holds the Trainer's use_distributed_sampler
        reorders = getattr(connector, "use_distributed_sampler", True)
        if stage == "fit" and reorders and getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) is not None:
            say(f"the warm start reads its batches in the order of Lightning's DistributedSampler under "
                f"{type(self.trainer.strategy).__name__}, even on one device: μ̄ and the scores differ from a "
                "single-device run's as between two orders of the data; compare runs of one strategy")

    def teardown(self, stage: str) -> None:
        writer = run_writer(self.trainer)
        if writer is not None and not writer.hold:  # the CLI holds a fit's run open for its test
            finish_run(self.trainer)

    def on_train_end(self):
        adapter_state = full_adapter_state(self.model)  # sharded: gathered on every rank (a collective)
        writer = run_writer(self.trainer)
        if writer is None:
            return
        run = self.steering_state.run or (self.fixed_strength_run() if self.mu is not None else None)
        if run is None:  # no μ̄: the adapter alone, which is not a run to steer with
            writer.save_adapter(self.model, adapter_state, portable_base(self.hparams.model)[0])
        else:  # with the contrastive γ when it was fit on these weights already (else it is added later)
            run.contrastive_gamma = self.gamma
            writer.write_run(self.model, run, self.tokenizer, adapter_state=adapter_state)

    def fixed_strength_run(self) -> SteeringRun:
        h = self.hparams
        return SteeringRun(model=h.model, adapter=h.adapter, steering=self.steering_config,
                           solver=SolverSettings(strength="fixed"),
                           adapter_options=h.adapter_options, tokenizer_sha256=tokenizer_hash(self.tokenizer),
                           hparams=dict(h), datasets=datasets_of(self.trainer.datamodule))
