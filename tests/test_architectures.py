"""Any Hugging Face causal LM, exactly: the architecture matrix.

Tiny random models of eleven families (tests/families.py; sliding windows shorter than the prompts, and
the same families with windows wider than them, so the shared-work layouts run too) × LoRA, IA3, prompt
tuning and prefix tuning with our default targets × both forward modes × every scoring layout we ship
(full rows, the tree layout of sdpa/eager, the KV-shared layout that flash-attention users get, the split
prefix cache) × sdpa and eager where the family has both. Each is held against a slow fp64 reference
written from the formulas alone (svdecode.md §2): one full forward per row with the adapter on and one
with it off (peft's ``disable_adapter``), nothing from the package.

Tolerance: the package computes in fp32; a summed log-prob of ≤ 12 tokens then carries ≤ 12 × ~1e-6 of
rounding per log-softmax, amplified by |μ| ≤ 2 through δz: 1e-4 nats is ~10× that. A layout that drops a
sliding window is off by whole nats here.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from svd_lightning import models
from svd_lightning.forward import encoders
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.calibration import CalibrationNeeds, calibrate, calibrate_pass
from svd_lightning.config import SteeringConfig
from svd_lightning.forward.rows import one_forward_unsupported
from svd_lightning.generation import steered_generate
from svd_lightning.scoring import score_choices

from families import ATTENTION, FAMILIES, family_model

# The device the package runs on (benchmarks/gpu_check.sh sets cuda); the fp64 reference stays on the CPU.
DEVICE = __import__("os").environ.get("SVD_TEST_DEVICE", "cpu")

PRIMER = "Interpret each question literally, and as a question about the real world. "
QUESTIONS = [
    ChoiceExample(PRIMER + "Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"],
                  [True, False, False], 0, answer=" Paris"),
    ChoiceExample(PRIMER + "Q: Is the sky blue?\nA:", [" Yes", " No, it is green on most days"], [True, False], 1,
                  answer=" Yes"),
    ChoiceExample(PRIMER + "Q: What happens if you eat a pomegranate?\nA:", [" Nothing in particular happens.",
                  " You will die."], [True, False], 2, answer=" Nothing in particular happens."),
    ChoiceExample(PRIMER + "Q: Is the sky blue?\nA:", [" Yes it is"], [True], 3, answer=" Yes it is"),
]
MU, ALPHA = -1.5, 0.1
TOL, RTOL = 1e-4, 1e-5  # nats, and relative to the score (module doc)
ADAPTERS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
WIDE = {f"{family}-wide": family for family in ("mistral", "gemma3")}  # windows wider than every row


def adapted(family: str, method: str, tokenizer, attn: str | None = None):
    """A tiny model of ``family`` with a ``method`` adapter at our defaults, perturbed away from identity."""
    base = family_model(WIDE.get(family, family), len(tokenizer), attn=attn)
    if family in WIDE:
        base.config.sliding_window = 512
    options = {"num_virtual_tokens": 4} if method in ("prompt_tuning", "prefix_tuning") else {}
    torch.manual_seed(1)
    model = models.apply_adapter(base, method, **options)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:  # prompt / prefix embeddings and their encoders
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval().to(DEVICE)


def _full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    T = ids.shape[-1]
    return model(input_ids=ids.unsqueeze(0)).logits[0, -T:]  # prompt tuning prepends its virtual positions


def reference_rows(model, batch: dict):
    """Per row: fp64 warm and pre-trained log-probs at its labelled positions, their labels, the
    steering vector δz and the α mask -- one full forward per row with the adapter on, one with it off."""
    ref = copy.deepcopy(model).cpu().double()
    for ids, mask, labels in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["labels"].cpu()):
        n = int(mask.sum())
        ids, labels = ids[:n], labels[:n]
        warm = torch.log_softmax(_full_logits(ref, ids).double(), -1)
        with ref.disable_adapter():
            base = torch.log_softmax(_full_logits(ref, ids).double(), -1)
        t = (labels[1:] != -100).nonzero().squeeze(1)
        w, b = warm[t], base[t]
        p = w.exp()
        r = w - b
        delta = p * ((p * r).sum(-1, keepdim=True) - r)  # p ⊙ (KL − r)
        yield w, b, labels[1:][t], delta, p >= ALPHA * p.max(-1, keepdim=True).values


def reference_scores(model, batch: dict, mu: float = MU) -> dict[str, torch.Tensor]:
    """plain / base / steered summed log-probs per row (fp64)."""
    out = {"plain": [], "base": [], "steered": []}
    for w, b, y, delta, keep in reference_rows(model, batch):
        steered = torch.log_softmax(w + mu * torch.where(keep, delta, 0.0), -1)  # masked: δ̂ = 0, warm logits kept
        for name, lp in (("plain", w), ("base", b), ("steered", steered)):
            out[name].append(lp.gather(1, y[:, None]).sum())
    return {k: torch.stack(v) for k, v in out.items()}


def _modes(model) -> list[str]:
    return ["two_pass"] if one_forward_unsupported(model) else ["one_forward", "two_pass"]


def _batches(tokenizer):
    tok = Tokenized(tokenizer, 128)
    return [{k: v.to(DEVICE) for k, v in collate_choices(part, tok).items()} for part in (QUESTIONS[:2], QUESTIONS[2:])]


CASES = [(family, method, attn) for family in [*FAMILIES, *WIDE] for method in ADAPTERS
         for attn in ATTENTION[WIDE.get(family, family)]]


@pytest.mark.parametrize("family,method,attn", CASES)
def test_steered_scores_match_the_fp64_reference_on_every_layout(tokenizer, family, method, attn, monkeypatch):
    model = adapted(family, method, tokenizer, attn)
    batches = _batches(tokenizer)
    expected = [reference_scores(model, b) for b in batches]
    layouts = {"rows": False, "shared": True}
    for mode in _modes(model):
        config = SteeringConfig(mu=MU, alpha=ALPHA)
        for layout, share in layouts.items():
            prefixes = PrefixCache()
            for _ in range(2):  # the second round finds the split prefix cached
                for batch, ref in zip(batches, expected):
                    got = score_choices(model, batch, config, forward_mode=mode, share_prompts=share, prefixes=prefixes)
                    for name in ("plain", "base", "steered"):
                        torch.testing.assert_close(got[name].double().cpu(), ref[name], rtol=RTOL, atol=TOL,
                                                   msg=lambda m: f"{family}/{method}/{attn}/{mode}/{layout} {name}: {m}")
        # the KV-shared layout (what flash attention gets): no custom mask, the prompt's cache expanded per row
        with monkeypatch.context() as patch:
            patch.setattr(encoders, "custom_masks", lambda m: None)
            for batch, ref in zip(batches, expected):
                got = score_choices(model, batch, config, forward_mode=mode, share_prompts=True)
                torch.testing.assert_close(got["steered"].double().cpu(), ref["steered"], rtol=RTOL, atol=TOL,
                                           msg=lambda m: f"{family}/{method}/{attn}/{mode}/kv-shared: {m}")


def reference_strengths(model, batch: dict) -> dict[str, float]:
    """The per-token strengths μ* of the calib reference answers (fp64) and their mean, median and pooled
    ratio, identity and Fisher curvature (svdecode.md §2)."""
    num, den_i, den_f = [], [], []
    for w, _, y, delta, keep in reference_rows(model, batch):
        p = w.exp()
        d = torch.where(keep, delta, 0.0)
        e = torch.nn.functional.one_hot(y, p.shape[-1]).double()
        num.append(((e - p) * d).sum(-1))
        den_i.append((d * d).sum(-1))
        jd = p * d - p * (p * d).sum(-1, keepdim=True)  # J δ̂, J = diag(p) − p pᵀ
        den_f.append((d * jd).sum(-1))
    num, den_i, den_f = torch.cat(num), torch.cat(den_i), torch.cat(den_f)
    ok = den_i.sqrt() >= 1e-12
    num, den_i, den_f = num[ok], den_i[ok], den_f[ok]
    mu_i, mu_f = num / (den_i + 1e-12), num / (den_f + 1e-12)

    def trimmed(mu: torch.Tensor, trim: float = 0.1) -> float:  # drop int(trim·n) at each tail
        k = int(trim * mu.numel())
        return mu.sort().values[k: mu.numel() - k].mean().item()

    return {"mean_identity": mu_i.mean().item(), "median_identity": mu_i.quantile(0.5).item(),
            "median_fisher": mu_f.quantile(0.5).item(),
            "trimmed_identity": trimmed(mu_i), "trimmed_fisher": trimmed(mu_f),
            "pooled_identity": (num.sum() / (den_i + 1e-12).sum()).item(), "mean_fisher": mu_f.mean().item(),
            "pooled_fisher": (num.sum() / (den_f + 1e-12).sum()).item()}


def _row_log_probs(model, batch: dict):
    """``f(mus) -> [len(mus), rows]``: each row's summed steered label log-prob at every μ (fp64)."""
    rows = list(reference_rows(model, batch))
    w = torch.cat([r[0] for r in rows])
    d = torch.cat([torch.where(r[4], r[3], 0.0) for r in rows])  # δ̂
    y = torch.cat([r[2] for r in rows])
    row = torch.cat([torch.full((len(r[2]),), i) for i, r in enumerate(rows)])

    def f(mus: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(w + mus.view(-1, 1, 1) * d, -1).gather(2, y.view(1, -1, 1).expand(len(mus), -1, 1))[..., 0]
        return torch.zeros(len(mus), len(rows), dtype=torch.float64).index_add(1, row, lp)
    return f


def _minimise(loss) -> float:
    """The minimiser of a smooth 1-D loss (``loss(mus [K]) -> [K]``): a log-spaced scan over 0, ±0.01 … ±1000,
    then golden section between the best point's neighbours."""
    side = torch.logspace(-2, 3, 81, dtype=torch.float64)
    grid = torch.cat([-side.flip(0), torch.zeros(1, dtype=torch.float64), side])
    values = loss(grid)
    i = int(values.argmin())
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    g = (5 ** 0.5 - 1) / 2
    for _ in range(80):
        c, d = b - g * (b - a), a + g * (b - a)
        lc, ld = loss(torch.tensor([c, d], dtype=torch.float64)).tolist()
        a, b = (a, d) if lc < ld else (c, b)
    return (a + b) / 2


def reference_exact(model, batch: dict) -> float:
    """``exact``: the μ minimising the calib NLL of the reference answers' tokens, −Σ log softmax(z_φ + μ δ̂)[y]."""
    f = _row_log_probs(model, batch)
    return _minimise(lambda mus: -f(mus).sum(1))


def reference_choice_nll(model, batch: dict) -> float:
    """``choice_nll``: the μ minimising the calib multiple-choice loss, −Σ_sets log Σ_true softmax(S_c(μ))."""
    f = _row_log_probs(model, batch)
    sets = {}
    for i, key in enumerate(zip(batch["question_index"].tolist(), batch["choice_set"].tolist())):
        sets.setdefault(key, []).append(i)
    true = batch["is_true"].bool()
    groups = [(torch.tensor(m), true[m]) for m in sets.values() if true[m].any()]

    def loss(mus: torch.Tensor) -> torch.Tensor:
        s = f(mus)
        return -sum(torch.logsumexp(s[:, m][:, t], 1) - torch.logsumexp(s[:, m], 1) for m, t in groups)
    return _minimise(loss)


@pytest.mark.parametrize("family", [*FAMILIES, *WIDE])
def test_calibration_statistics_match_the_fp64_reference(tokenizer, family):
    from svd_lightning.batch import collate_lm

    model = adapted(family, "lora", tokenizer)
    batch = collate_lm(QUESTIONS, Tokenized(tokenizer, 128))
    expected = reference_strengths(model, batch)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    choices = collate_choices(QUESTIONS, Tokenized(tokenizer, 128))
    exact, choice = reference_exact(model, batch), reference_choice_nll(model, choices)
    choices = {k: v.to(DEVICE) for k, v in choices.items()}
    settings = SteeringConfig(alpha=ALPHA)
    for mode in _modes(model):
        result = calibrate(model, [batch], settings, forward_mode=mode, progress=False)
        summary = result.stats.summary()
        for key, value in expected.items():
            # fp32 numerators and denominators: relative 1e-4, and absolute for strengths near 0
            assert summary[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{family}/{mode} {key}"
        # the solved strengths: minimisers of fp32 losses, flat near their minimum -- 1e-3 relative
        assert result.cache.solve() == pytest.approx(exact, rel=1e-3, abs=1e-3), f"{family}/{mode} exact"
        needs = CalibrationNeeds(choice_caches={"c": settings})
        solved = calibrate_pass(model, [choices], settings, needs, progress=False, forward_mode=mode)
        assert solved.choice_caches["c"].cache.solve() == pytest.approx(choice, rel=1e-3, abs=1e-3), f"{family}/{mode} choice_nll"


def reference_greedy(model, ids: torch.Tensor, steps: int, mu: float = MU, alpha: float = ALPHA) -> list[int]:
    """Greedy steered decoding from the formulas: full forwards, masked tokens −∞ after scaling."""
    ref = copy.deepcopy(model).cpu().double()
    ids = ids.clone()
    for _ in range(steps):
        w = _full_logits(ref, ids)[-1].double()
        with ref.disable_adapter():
            b = _full_logits(ref, ids)[-1].double()
        lw, lb = torch.log_softmax(w, -1), torch.log_softmax(b, -1)
        p = lw.exp()
        r = lw - lb
        delta = p * ((p * r).sum() - r)
        keep = p >= alpha * p.max()
        steered = torch.where(keep, w + mu * delta, float("-inf"))
        ids = torch.cat([ids, steered.argmax().view(1)])
    return ids.tolist()


@pytest.mark.parametrize("family", [*FAMILIES, *WIDE])
@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_greedy_generation_matches_the_fp64_reference(tokenizer, family, method):
    model = adapted(family, method, tokenizer)
    prompt = torch.tensor(tokenizer(PRIMER + "Q: Is the sky blue?\nA:")["input_ids"])
    expected = reference_greedy(model, prompt, steps=6)
    for mode in _modes(model):
        out = steered_generate(model, prompt[None].to(DEVICE), torch.ones_like(prompt)[None].to(DEVICE),
                               SteeringConfig(mu=MU, alpha=ALPHA), forward_mode=mode, max_new_tokens=6, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        assert out[0].cpu().tolist() == expected, f"{family}/{method}/{mode}"


@pytest.mark.parametrize("family", ["mistral", "gemma3", "phi3", "gpt2"])
def test_every_generation_entry_point_matches_the_fp64_reference(tokenizer, family):
    """``SteeredModel.generate``, ``custom_generate`` and ``logits_processor`` on a user's own generate call."""
    from transformers import LogitsProcessorList

    from svd_lightning.api import SteeredModel

    model = adapted(family, "lora", tokenizer)
    text = PRIMER + "Q: Is the sky blue?\nA:"
    prompt = torch.tensor(tokenizer(text)["input_ids"])
    expected = reference_greedy(model, prompt, steps=6)
    sm = SteeredModel(model, tokenizer, SteeringConfig(mu=MU, alpha=ALPHA))
    enc = {"input_ids": prompt[None].to(DEVICE), "attention_mask": torch.ones_like(prompt)[None].to(DEVICE)}
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    own = sm.model.generate(**enc, custom_generate=sm.custom_generate, **kw)
    processed = sm.model.generate(**enc, logits_processor=LogitsProcessorList([sm.logits_processor(enc["attention_mask"])]), **kw)
    for name, out in (("custom_generate", own), ("logits_processor", processed)):
        assert out[0].cpu().tolist() == expected, f"{family}: {name}"
    [answer] = sm.generate([text], max_new_tokens=6, eos_token_id=None)
    assert answer == tokenizer.decode(expected[len(prompt):], skip_special_tokens=True), family


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2", "mistral-wide"])
def test_the_lm_eval_backends_logits_match_full_rows(tokenizer, family):
    """lm-eval's ``_model_call`` path (``paired_logits`` with the split prefix): warm and base logits of rows
    sharing a primer equal one full forward per row, windows shorter or longer than the rows."""
    from svd_lightning.scoring import paired_logits

    model = adapted(family, "lora", tokenizer)
    rows = [tokenizer(q.prompt + q.choices[0])["input_ids"] for q in QUESTIONS[:2]]
    width = min(map(len, rows))
    ids = torch.tensor([r[:width] for r in rows], device=DEVICE)
    skip = len(tokenizer(PRIMER)["input_ids"]) - 1
    ref = copy.deepcopy(model).cpu().double()
    with torch.no_grad():
        warm_ref = torch.stack([_full_logits(ref, r.cpu()) for r in ids])
        plain_fp32 = torch.stack([_full_logits(model, r) for r in ids]).double().cpu()
        with ref.disable_adapter():
            base_ref = torch.stack([_full_logits(ref, r.cpu()) for r in ids])
    # as exact as a plain fp32 forward of each row: twice its own distance to fp64
    floor = 2 * (plain_fp32 - warm_ref).abs().max().item() + 1e-6
    for mode in _modes(model):
        prefixes = PrefixCache()
        for _ in range(2):  # the second call finds the primer cached
            warm, base = paired_logits(model, ids, mode, skip=skip, prefixes=prefixes)
            n = warm.shape[1]
            torch.testing.assert_close(warm.double().cpu(), warm_ref[:, -n:], rtol=0, atol=floor)
            torch.testing.assert_close(base.double().cpu(), base_ref[:, -n:], rtol=0, atol=floor)


@pytest.mark.parametrize("family,method", [(f, "lora") for f in FAMILIES] + [("phi3", "ia3"), ("gpt2", "ia3")])
def test_fit_runs_on_every_family_with_the_shipped_tiny_config(tmp_path, monkeypatch, tokenizer, family, method):
    """`svd-lightning fit --config configs/tiny.yaml` on a saved tiny model of each family: no hand-written
    target_modules, the run's adapter wraps the family's attention projections, and μ̄ is finite."""
    import json

    from conftest import cli_tiny_fit

    folder = tmp_path / family
    family_model(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run, _ = cli_tiny_fit(tmp_path, monkeypatch, "--model.model", str(folder), "--model.adapter", method,
                          *(["--model.adapter_options", "{}"] if method == "ia3" else []),
                          "--data.init_args.limit_train", "4", "--data.init_args.limit_calib", "4",
                          "--data.init_args.limit_test", "4")
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = family_model(family, len(tokenizer))
    assert sorted(adapter["target_modules"]) == sorted(models.adapter_config(method, base).target_modules)
    steering = json.loads((run / "steering.json").read_text())["steering"]
    assert torch.isfinite(torch.tensor(steering["mu"]))


# -- the paper's models as configs ---------------------------------------------------------------------------------
PAPER = {  # config -> the tiny family standing in for its model (same family, tied or untied as the real one)
    "paper/qwen2.5-1.5b-lora.yaml": "qwen2-tied", "paper/qwen2.5-1.5b-ia3.yaml": "qwen2-tied",
    "paper/qwen2.5-7b-prompt_tuning.yaml": "qwen2", "paper/llama-3.1-8b-lora.yaml": "llama",
}


@pytest.mark.parametrize("config", sorted(PAPER))
def test_paper_configs_hold_the_papers_protocol_and_fit_one_80gb_gpu(config, capsys):
    import importlib.util
    import json

    import yaml

    from svd_lightning.cli import main

    from conftest import ROOT

    with pytest.raises(SystemExit):  # the merged settings, as the CLI parses them
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    settings = yaml.safe_load(capsys.readouterr().out)
    model, trainer, data = settings["model"], settings["trainer"], settings["data"]["init_args"]
    assert (model["learning_rate"], model["alpha"], trainer["max_epochs"]) == (5e-5, 0.1, 1)
    assert (data["train_batch_size"], data["max_length"], data["split"]) == (1, 512, [0.6, 0.2, 0.2])
    assert (settings["solver"]["strength"], settings["solver"]["curvature"]) == ("mean", "identity")
    assert "/" in model["model"] and trainer["precision"] == "bf16-mixed" and trainer["devices"] == 1
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    scale = sys.modules["scale"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(scale)
    coef = json.loads((ROOT / "benchmarks/results/scale_cpu.json").read_text())["memory_model"]
    # fp32 weights (scoring stays exact), one 80 GB GPU, no sharding: the memory model's prediction
    fit = scale.predict(scale.PAPER_MODELS[model["model"]], 1, False, coef, dtype_bytes=4)
    assert fit["fits"] and fit["train_tokens_per_gpu"] >= data["max_length"], fit


@pytest.mark.parametrize("config", sorted(PAPER))
def test_paper_configs_run_end_to_end_on_a_tiny_model_of_their_family(config, tmp_path, monkeypatch, tokenizer):
    import json

    from svd_lightning.cli import main

    from conftest import ROOT, write_truthfulqa

    family = PAPER[config]
    folder = tmp_path / family
    family_model(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_truthfulqa(tmp_path / "mc.json")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / config), "--model.model", str(folder),
          "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.init_args.path", str(data),
          "--data.init_args.instruction", "false", "--data.init_args.few_shot", "false",
          "--data.init_args.limit_train", "4", "--data.init_args.limit_calib", "4", "--data.init_args.limit_test", "4"])
    record = json.loads((tmp_path / "runs/version_0/steering.json").read_text())
    assert record["solver"]["strength"] == "mean" and torch.isfinite(torch.tensor(record["steering"]["mu"]))
