"""The steered validation / test report: the table, paired bootstrap CIs, the per-question files and figure."""

from __future__ import annotations


import lightning as L
import torch

from svd_lightning.config import VARIANT_LABELS
from svd_lightning.figures import questions_figure, questions_figure_name
from svd_lightning.logger import run_writer
from svd_lightning.metrics import HEADLINE_METRICS, variant_table
from svd_lightning.run import METRICS_FILE
from svd_lightning.statistics import paired_bootstrap


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
            split = "the val split" if stage == "val" else "the test split"  # a user's DataModule says what val is
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
