"""Everything a refactor must not move, as one JSON: tiny runs' μ̄, γ, metrics and per-question scores, and
a finished run's scores and greedy answers through ``SteeredModel``. Floats are written with ``repr``, so
two snapshots from the same machine compare byte for byte (``cmp``):

    python scripts/equality.py /tmp/before.json      # on the old commit
    python scripts/equality.py /tmp/after.json       # on the new one
    cmp /tmp/before.json /tmp/after.json

Three tiny fits (about 20 s each on 2 cores): the default (one forward; its 256-token rows cut the six-shot
primer from the left), two passes, and the whole primer, whose shared prefix exercises the prefix cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "default": [],
    "two_pass": ["--model.forward_mode", "two_pass"],
    "primer": ["--data.init_args.max_length", "1024"],  # the whole six-shot primer: a prefix every row shares
}
FILES = ("metrics.json", "val_per_question.json", "test_per_question.json", "calibration_curve.json")
STEERING = ("steering", "solver", "contrastive_gamma", "aggregates", "diagnostics", "global_step", "weights")  # not the hashes:
# adapter_sha256 names a temp path


def snapshot(run: Path) -> dict:
    from safetensors.torch import load_file

    from svd_lightning import SteeredModel

    record = json.loads((run / "steering.json").read_text())
    out = {key: record.get(key) for key in STEERING}
    out.update({name: json.loads((run / name).read_text()) for name in FILES if (run / name).exists()})
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    out["adapter_weights"] = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    model = SteeredModel.from_run_dir(run)
    scores = model.score("Q: What is the capital of France?\nA:", [" Paris", " Lyon", " I have no comment"])
    out["score"] = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in scores.items()}
    out["generate"] = model.generate(["Q: Why is the sky blue?\nA:", "Q: 2+2?\nA:"], max_new_tokens=8)
    return out


def main(path: str) -> None:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in RUNS.items():
            root = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "svd_lightning.entry", "fit", "--config", "tiny",
                            "--trainer.default_root_dir", str(root), *options], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result[name] = snapshot(root / "version_0")
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True, default=repr) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
