"""The run directory: what a run holds, and the one place that writes and reads it.

A run directory holds ``adapter/`` (peft ``save_pretrained``), ``steering.json`` (a
:class:`SteeringRun`) and ``README.md`` (its model card, :mod:`svd_lightning.card`) when a μ̄ was
solved, next to ``config.yaml``, ``metrics.csv``,
``metrics.json``, the per-question scores, ``predictions.jsonl``, ``skipped_rows.jsonl`` and
``logit_snapshots.pt`` of the command that made it.

**A run is written whole or not at all.** :class:`RunWriter` builds it in a hidden sibling
(``.version_3.partial-<pid>-<token>``) and renames that into place once the command has
finished, so a kill at any moment (SIGKILL included) leaves the previous runs as they were and
either the new complete run or none. Nothing writes into a finished run: a target that exists
already gets the next free name, and says so. Two commands writing "the same" run both finish,
under two names. The partial directory of a killed command stays where it is (its checkpoints
can resume it) and is named when the next run starts.

``steering.json`` records the SHA-256 of the adapter (its config and its weights) and of the
tokenizer's vocabulary; loading checks both, and that the adapter is the kind the run names.
"""

from svd_lightning.run.loading import DEFAULTS, RESOLVABLE, attach_adapter, load_base, load_run, resolve_settings
from svd_lightning.run.record import (
    ADAPTER_DIR,
    FORMAT_VERSION,
    HASHES,
    METRICS_FILE,
    RUN_FILE,
    TIMINGS_FILE,
    RunError,
    SteeringRun,
    adapter_hash,
    adapter_kind,
    check_tokenizer,
    library_versions,
    tokenizer_hash,
)
from svd_lightning.run.writer import PARTIAL, RunWriter, is_taken, next_free, next_version, write_run

__all__ = ["ADAPTER_DIR", "DEFAULTS", "FORMAT_VERSION", "HASHES", "METRICS_FILE", "PARTIAL", "RESOLVABLE", "RUN_FILE", "TIMINGS_FILE",
           "RunError", "RunWriter", "SteeringRun", "adapter_hash", "adapter_kind", "attach_adapter", "check_tokenizer",
           "is_taken", "library_versions", "load_base", "load_run", "next_free", "next_version", "resolve_settings",
           "tokenizer_hash", "write_run"]
