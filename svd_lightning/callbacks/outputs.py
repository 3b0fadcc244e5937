"""What ``fit`` and ``predict`` leave for inspection: logit snapshots and every question's scores."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from svd_lightning.callbacks.calibration import calibration_loader
from svd_lightning.config import VARIANT_LABELS
from svd_lightning.log import say
from svd_lightning.scoring import paired_label_logits
from svd_lightning.files import atomic_write_text
from svd_lightning.logger import run_writer
from svd_lightning.sharding import lockstep


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
            warm, base, labels, _ = paired_label_logits(pl_module.model, batch, prefixes=pl_module.prefixes)
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
