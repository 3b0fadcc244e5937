"""``svd-lightning``: the console script. Answers ``--help`` without importing torch or Lightning, then hands
the command to :mod:`svd_lightning.cli` (fit, validate, test, predict, generate, eval)."""

from __future__ import annotations

import sys

HELP = """\
svd-lightning: Steering Vector Decoding (SVDecode, NeurIPS 2025) with PyTorch Lightning. Warm-start a peft
adapter on a task, solve the steering strength μ̄ on calibration data, and score and generate with the
steered model; every command writes or reads a run directory.

usage:
  svd-lightning {{fit,validate,test,predict}} --config NAME_OR_FILE [options]   (LightningCLI; add --help)
  svd-lightning generate --run-dir RUN --prompts IN.jsonl --out OUT.jsonl        steered answers to prompts
  svd-lightning eval --run-dir RUN --tasks TASKS [options]                      lm-eval tasks, steered

shipped configs (--config NAME): {configs}
data: a config's data path is read as given, else under $SVD_LIGHTNING_DATA; see the README.
"""


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        from svd_lightning.recipes import config_names

        print(HELP.format(configs=", ".join(config_names())), end="")
        return
    from svd_lightning.cli import main as run

    run(args)


if __name__ == "__main__":
    main()
