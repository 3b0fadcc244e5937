"""The user-facing benchmarks (benchmarks/): cost, the memory model of scale.py, open generation's proxy."""

import importlib
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    return importlib.import_module(f"benchmarks.{name}")


def test_truthfulness_proxy():
    og = _load("open_generation")
    good = og.truth_proxy("Nothing happens if you crack your knuckles.",
                          ["Nothing in particular happens if you crack your knuckles"], ["You will get arthritis"])
    bad = og.truth_proxy("You get arthritis.", ["Nothing in particular happens"], ["You will get arthritis"])
    assert good["rougeL_acc"] == 1.0 and good["rougeL_diff"] > 0
    assert bad["rougeL_acc"] == 0.0 and bad["rougeL_diff"] < 0
    assert og.first_line(" Paris.\nQ: next question") == "Paris."


def test_cost_benchmark_runs_both_paths_and_reports_spread(tmp_path):
    """benchmarks/cost.py on the tiny model: every task, both paths, ratios as median [min, max]."""
    cost = _load("cost")
    out = tmp_path / "cost.json"
    cost.main(["--model", "tiny-random", "--repeats", "2", "--score-questions", "2", "--calib-questions", "4",
               "--calib-batch-size", "2", "--train-steps", "2", "--gen-batch-sizes", "1", "2", "--new-tokens", "4",
               "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["task"], r["variant"]): r for r in result["rows"]}
    for task in ("score", "generate_b1", "generate_b2", "calibration_b1", "calibration_b2"):
        for path in ("two_pass", "one_forward"):
            row = rows[(task, path)]
            assert len(row["seconds"]["all"]) == 2
            assert row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
            ratio = row.get("ratio_vs_plain") or row["ratio_vs_demo_epoch"]
            assert ratio["min"] > 0
    assert result["precision"] in ("32-true", "bf16-mixed") and "oneDNN bf16" in result["device_name"]


def test_peers_scores_the_same_rows_as_lm_eval_and_trains_as_the_hf_trainer(tmp_path, monkeypatch):
    """benchmarks/peers.py in its scoped form on a tiny run: lm-eval's `hf` model and our scorer score the same
    questions and choices (plain MC2 equal per question; every choice's log-likelihood equal to fp32 rounding of a
    few hundred token log-probs), the HF Trainer and our warm start take the same steps on the same batches from the
    same initialisation (the tiny config's LoRA has no dropout: equal losses), and both generations run."""
    from conftest import cli_tiny_fit

    pytest.importorskip("lm_eval")
    run, _ = cli_tiny_fit(tmp_path, monkeypatch)
    out = tmp_path / "peers.json"
    _load("peers").main(["--run-dir", str(run), "--limit", "3", "--steps", "2", "--repeats", "1", "--new-tokens", "2",
                         "--out", str(out)])
    result = json.loads(out.read_text())
    scoring, warm, generation = result["scoring"], result["warm_start"], result["generation"]
    assert scoring["questions"] == 3 and scoring["plain_mc2"]["max_abs_diff_per_question"] <= 1e-6
    assert 0 < scoring["plain_mc2"]["ours"] < 1  # not a saturated score that any two scorers would share
    assert scoring["plain_mc2"]["loglikelihood_max_abs_diff"] <= 1e-3
    assert scoring["scoring_vs_lm_eval_ratio"] > 0 and scoring["plain_scoring_vs_lm_eval_ratio"] > 0
    assert warm["steps"] == 2 and len(warm["ours_lightning"]["losses"]) == len(warm["hf_trainer_peft"]["losses"]) == 2
    assert warm["loss_max_abs_diff"] <= 1e-4 and warm["warm_start_vs_trainer_ratio"] > 0
    assert {"batch_1", "batch_8", "generation_steered_vs_plain_ratio_b8"} <= set(generation)
    assert "oneDNN bf16" in result["machine"]


SMALL = dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=300)


@pytest.mark.parametrize("tied", [True, False])
def test_scale_shape_counts_the_parameters_transformers_and_peft_build(tied):
    scale = _load("scale")
    shape = scale.Shape(**SMALL, tied=tied)
    model = scale.build_model(shape)
    assert sum(p.numel() for p in model.parameters()) == shape.params() + shape.lora_params()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == shape.lora_params()
    with torch.device("meta"):  # the measured 1B shape, without allocating it
        from transformers import LlamaConfig, LlamaForCausalLM

        s = scale.SIZES["1b"]
        big = LlamaForCausalLM(LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                                           num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                           num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied))
    assert sum(p.numel() for p in big.parameters()) == s.params()


def test_scale_kv_bytes_per_token_is_what_the_cache_holds():
    scale = _load("scale")
    shape = scale.Shape(**SMALL)
    model = scale.build_model(shape).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.arange(1, 8)[None], use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 7 * shape.kv_bytes_per_token(4)


def _scale_cell(size, shape, a, b, c, f, ranks=1, extra_mb=50.0):
    """A cell file whose training memory grows by L·(a·d + b·ffn) + c·V fp32 elements a token, forward-only by f·V."""
    per_token = shape.layers * (a * shape.hidden + b * shape.ffn) + c * shape.vocab
    units = {f"warm_start_b{bs}/train": {"tokens": tokens, "peak_extra_mb": extra_mb + per_token * 4 * tokens / 2**20}
             for bs, tokens in ((1, 20), (4, 90))}
    for unit in ("calibration", "scoring"):
        for path in ("one_forward", "two_pass"):
            units[f"{unit}/{path}"] = {"tokens": 100, "peak_extra_mb": f * shape.vocab * 4 * 100 / 2**20}
    from dataclasses import asdict

    return {"size": size, "ranks": ranks, "shape": asdict(shape), "params": shape.params(), "per_rank": [{"units": units}] * ranks}


def test_scale_memory_model_recovers_known_coefficients():
    scale = _load("scale")
    shapes = {**scale.SIZES, **scale.PROBES}
    cells = [_scale_cell(name, shape, a=34.0, b=6.0, c=3.0, f=2.5) for name, shape in shapes.items()]
    # a sharded cell: the same per-token growth, plus 1.5 x (root unit + 2 layers) gathered (fp32), on top of 50 MB
    big = scale.SIZES["1b"]
    gathered_mb = 1.5 * (big.root_params() + 2 * big.layer_params()) * 4 / 2**20
    cells.append(_scale_cell("1b", big, a=34.0, b=6.0, c=3.0, f=0.0, ranks=2, extra_mb=50.0 + gathered_mb))
    small = scale.SIZES["135m"]  # a smaller model's larger factor is reported, not used
    cells.append(_scale_cell("135m", small, a=34.0, b=6.0, c=3.0, f=0.0, ranks=2,
                       extra_mb=50.0 + 4.0 * (small.root_params() + 2 * small.layer_params()) * 4 / 2**20))
    coef = scale.fit_memory_model(cells)
    assert coef["a_per_layer_hidden"] == pytest.approx(34.0, rel=1e-6)
    assert coef["b_per_layer_ffn"] == pytest.approx(6.0, rel=1e-5)
    assert coef["c_per_vocab"] == pytest.approx(3.0, rel=1e-5)
    assert coef["f_forward_per_vocab"] == pytest.approx(2.5, rel=1e-9)
    assert coef["gather_factor"] == pytest.approx(1.5, rel=1e-9)
    assert coef["gather_factors"] == pytest.approx([4.0, 1.5], rel=1e-9)  # smallest model first
    with pytest.raises(ValueError, match="at least 3 sizes"):
        scale.fit_memory_model(cells[:2])


def test_scale_prediction_shards_weights_and_adapter_state():
    scale = _load("scale")
    coef = {"a_per_layer_hidden": 34.0, "b_per_layer_ffn": 6.0, "c_per_vocab": 3.0, "gather_factor": 1.5}
    s = scale.TARGETS["70b"]
    assert 69e9 < s.params() < 72e9  # Llama-3-70B: 70.6B
    single, ddp, fsdp = (scale.predict(s, g, sh, coef) for g, sh in ((1, False), (8, False), (8, True)))
    assert single["weights_gb"] == ddp["weights_gb"] == pytest.approx(s.params() * 2 / 1e9)
    gathered = 1.5 * (s.root_params() + 2 * s.layer_params()) * 2
    assert fsdp["weights_gb"] == pytest.approx((s.params() * 2 / 8 + gathered) / 1e9)
    assert fsdp["adapter_state_gb"] == pytest.approx(s.lora_params() * 16 / 8 / 1e9)
    assert not single["fits"] and not ddp["fits"] and fsdp["fits"]
    free = 80e9 * 0.9 - (fsdp["weights_gb"] + fsdp["adapter_state_gb"]) * 1e9
    assert fsdp["train_tokens_per_gpu"] == int(free // ((34.0 * s.hidden + 6.0 * s.ffn) * s.layers * 2 + 3.0 * s.vocab * 4))
    assert fsdp["kv_tokens_per_gpu"] == int(free // (2 * s.kv_bytes_per_token(2)))
