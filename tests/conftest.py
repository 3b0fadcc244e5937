"""Shared test helpers: tiny random models and a local tokenizer (no downloads anywhere in the suite),
synthetic data, trainers and run directories of the tiny model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.config import SteeringConfig
from svd_lightning.data import TruthfulQADataModule
from svd_lightning.scoring import score_choices
from svd_lightning.logger import RunLogger
from svd_lightning.run import RUN_FILE, SteeringRun, adapter_hash, write_run
from svd_lightning.tiny import tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_model_and_tokenizer()[1]


def perturbed_lora(seed: int = 0, dtype=torch.float32):
    """A tiny Llama with a LoRA adapter whose B matrices are random, so warm ≠ base.

    Both LoRA factors come from ``seed``: peft draws A from the global RNG, which earlier tests move,
    and a test must not depend on the order it runs in.
    """
    model, _ = tiny_model_and_tokenizer(seed)
    torch.manual_seed(seed)  # LoRA A's init
    peft_model = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return peft_model.eval()


def left_padded(tokenizer, prompts):
    """Token ids and attention mask of prompts, left padded as for generation."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture()
def lora_model():
    return perturbed_lora()


def save_tiny_run(model, run_dir, gamma=None, **fields):
    """``model`` (a tiny-random LoRA) saved as a finished run at ``run_dir``; ``fields`` override the default decode
    settings, ``gamma`` is the run's contrastive γ."""
    run = SteeringRun(model="tiny-random", adapter="lora", steering=SteeringConfig(**{"mu": -1.0, **fields}),
                      contrastive_gamma=gamma)
    return write_run(model, run, run_dir, tokenizer=tiny_model_and_tokenizer()[1])


def as_older_format(run_dir, version: int, drop=()):
    """Rewrite ``run_dir``'s steering.json as svd-lightning format ``version`` wrote it (its adapter hash
    rule, without the fields in ``drop``): a run from before a format change."""
    path = Path(run_dir) / RUN_FILE
    payload = json.loads(path.read_text())
    payload["format_version"] = version
    payload["adapter_sha256"] = adapter_hash(Path(run_dir) / "adapter", version)
    if version < 3:  # format 2: every setting in `steering`, with the contrastive γ and the forward mode
        payload["steering"].update(payload.pop("solver"), gamma=payload.pop("contrastive_gamma"), forward_mode="auto")
    if version < 2:  # flat settings, without the ones format 2 added
        steering = payload.pop("steering")
        payload.update({k: v for k, v in steering.items() if k not in ("forward_mode", "gamma")})
    for name in drop:
        payload.pop(name, None)
    if version == 0:
        payload.pop("format_version")
    path.write_text(json.dumps(payload))
    return path


# -- data, trainers and runs of the tiny model, shared by the test modules --------------------------------
ROOT = Path(__file__).resolve().parents[1]  # the repository
ANSWERS = ["Paris.", "I have no comment.", "Nothing happens.", "The dead outnumber the living.", "Yes", "No", "You will die."]


def write_truthfulqa(path: Path, n: int = 24) -> Path:
    """A synthetic mc_task.json: n questions, mc1 with 3-4 choices, mc2 with 2 true + 2-3 false."""
    rows = []
    for i in range(n):
        a = [ANSWERS[(i + k) % len(ANSWERS)] + (" " + str(i) if k == 0 else "") for k in range(5)]
        rows.append({
            "question": f"What happens in case {i}?",
            "mc1_targets": {a[0]: 1, a[1]: 0, a[2]: 0, **({a[3]: 0} if i % 2 else {})},
            "mc2_targets": {a[0]: 1, a[4]: 1, a[1]: 0, a[2]: 0, **({a[3]: 0} if i % 3 else {})},
        })
    path.write_text(json.dumps(rows))
    return path


def write_equal_answers(path: Path, n: int = 35) -> Path:
    """A synthetic mc_task.json whose best answers all have the same number of tokens ("answer1".."answer4").

    Data-parallel training averages per-rank mean losses, which equals one process's mean loss over
    the same global batch only when every row has as many label tokens: with these answers a real
    warm start (LoRA, IA3) gives the same weights on 1 rank and on N.
    """
    rows = []
    for i in range(n):
        a = [f"answer{(i + k) % 4 + 1}" for k in range(4)]
        rows.append({
            "question": f"What happens in case {i}?",
            "mc1_targets": {a[0]: 1, a[1]: 0, a[2]: 0, **({a[3]: 0} if i % 2 else {})},
            "mc2_targets": {a[0]: 1, a[3]: 1, a[1]: 0, **({a[2]: 0} if i % 3 else {})},
        })
    path.write_text(json.dumps(rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path: Path, data: Path, name: str, *args: str, timeout: float = 150) -> dict:
    """``tests/ddp_worker.py`` on ``data`` with ``args`` (e.g. ``--devices 2 --strategy fsdp2``) in a fresh
    process tree, its runs under ``tmp_path/name``; returns the JSON rank 0 wrote."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):  # no inherited launcher state
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), "--data", str(data), "--root", str(tmp_path / name),
           "--out", str(out), *args]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a rank-0-only collective deadlocks instead of failing
        pytest.fail(f"{name} timed out (collective mismatch?)\n{(e.stderr or b'')[-4000:]}")
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return {**json.loads(out.read_text()), "stderr": proc.stderr}


def tiny_datamodule(path, **kw):
    """A TruthfulQADataModule over a synthetic file, small enough for the tiny model."""
    kw = {"instruction": False, "batch_size": 2, "train_batch_size": 4, "max_length": 128, **kw}
    return TruthfulQADataModule(path=str(path), **kw)


def tiny_trainer(tmp_path, callbacks, **kw):
    """A CPU Trainer whose runs go to ``tmp_path`` (a RunLogger), no checkpoints, no progress bar."""
    kw = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": RunLogger(tmp_path),
          "enable_checkpointing": False, "num_sanity_val_steps": 0, "enable_progress_bar": False, **kw}
    return L.Trainer(callbacks=callbacks, **kw)


def cli_tiny_fit(tmp_path, monkeypatch, *extra: str) -> tuple[Path, list[str]]:
    """`svd-lightning fit` of configs/tiny.yaml on synthetic data, from tmp_path, with ``extra`` arguments;
    returns the run and the arguments that point later commands at the same data and root."""
    data = write_truthfulqa(tmp_path / "mc.json")
    monkeypatch.chdir(tmp_path)
    common = ["--data.init_args.path", str(data), "--trainer.default_root_dir", str(tmp_path / "runs" / "tiny"),
              "--trainer.enable_progress_bar", "false"]
    from svd_lightning.cli import main  # imports the CLI only where a test runs it

    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), *common, *extra])
    return tmp_path / "runs/tiny/version_0", common


def tiny_run(tmp_path, name="run", mu=-1.0, seed=0, **settings):
    """A complete tiny run directory written the way `fit` writes it: (its path, the model saved in it)."""
    model = perturbed_lora(seed)
    return save_tiny_run(model, Path(tmp_path) / name, mu=mu, **settings), model


# Short prompts and choice questions for the one-forward and device checks.
PROMPTS = ["Q: What is the capital of France? A:", "Q: What happens if you eat a pomegranate?\nA:", "Yes"]
EXAMPLES = [
    ChoiceExample("Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"], [True, False, False], 0,
                  answer=" Paris"),
    ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green on most days"], [True, False], 1, answer=" Yes"),
    ChoiceExample("Q: Is the sky blue?\nA:", [" Yes it is"], [True], 2, answer=" Yes it is"),
    ChoiceExample("Q: What happens if you eat a pomegranate?\nA:", [" Nothing in particular happens.", " You will die."],
                  [True, False], 3, answer=" Nothing in particular happens."),
]


# -- choice questions and a float64 model for the calibration and scoring references -------------------
CHOICE_EXAMPLES = [  # choice sets of both shapes (mc1 and mc2), as TruthfulQA has them
    ChoiceExample("Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"], [True, False, False], 0),
    ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green", " Yes it is", " No"], [True, False, True, False], 1,
                  choice_sets=[0, 0, 1, 1]),
    ChoiceExample("Q: What happens if you eat a pomegranate?\nA:", [" Nothing in particular happens.", " You will die.",
                  " Nothing happens.", " You die."], [True, False, True, False], 2, choice_sets=[0, 0, 1, 1]),
    ChoiceExample("Q: Who outnumbers whom?\nA:", [" The dead outnumber the living.", " The living outnumber the dead.",
                  " I have no comment."], [True, False, True], 3, choice_sets=[1, 1, 1]),
]


def prompt_sharing_batch(tokenizer, max_length=64):
    """Three choice questions, two of which share their prompt (the shared-prompt encoder's case)."""
    examples = [
        ChoiceExample("Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"], [True, False, False], 0),
        ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green on most days"], [True, False], 1),
        ChoiceExample("Q: Is the sky blue?\nA:", [" Yes it is"], [True], 2),  # same prompt, another question
    ]
    return collate_choices(examples, Tokenized(tokenizer, max_length))


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)  # LoRA A's init: a fixed model, so a failure reproduces
    return perturbed_lora(dtype=torch.float64)


def choice_batches(tokenizer, size=2):
    """CHOICE_EXAMPLES as choice batches of ``size`` questions."""
    tok = Tokenized(tokenizer, 64)
    return [collate_choices(CHOICE_EXAMPLES[i : i + size], tok) for i in range(0, len(CHOICE_EXAMPLES), size)]


def scored_choice_loss(model, batches, mu, **settings):
    """The choice loss from score_choices itself: Σ over (question, choice set) of −log Σ_true softmax(S)."""
    total = 0.0
    for batch in batches:
        s = score_choices(model, batch, SteeringConfig(mu=mu, **settings), forward_mode="two_pass")["steered"].double()
        for q, cset in {(int(a), int(b)) for a, b in zip(batch["question_index"], batch["choice_set"])}:
            sel = (batch["question_index"] == q) & (batch["choice_set"] == cset)
            t = batch["is_true"][sel].bool()
            total += float(torch.logsumexp(s[sel], 0) - torch.logsumexp(s[sel][t], 0))
    return total


# -- a hand-built grid for the selection statistics -----------------------------------------------------
def selection_table():
    """3 seeds × 2 variants, built so that the in-sample winner differs from the leave-one-seed-out pick.

    calib means: a = (1, 0, 0), b = (0, .6, .6). In-sample: seed 0 -> a, seeds 1, 2 -> b.
    LOSO: without seed 0, b (0.6 vs 0); without seed 1, a (0.5 vs 0.3); without seed 2, a (0.5 vs 0.3).
    """
    calib = {"a": [np.ones(2), np.zeros(2), np.zeros(2)], "b": [np.zeros(2), np.full(2, 0.6), np.full(2, 0.6)]}
    test = {"a": [np.array([1.0, 0.0]), np.zeros(2), np.ones(2)], "b": [np.zeros(2), np.ones(2), np.array([0.0, 1.0])]}
    warm = [np.zeros(2)] * 3
    return calib, test, warm
