"""Steered beam search / multi-sample generation against slow references, and the generate CLI."""

import json

import pytest
import torch
from transformers import LogitsProcessor

from svd_lightning.config import SteeringConfig
from svd_lightning.generation import steered_generate
from svd_lightning.generation import generate_answers
from svd_lightning.generate import main, read_prompts
from svd_lightning.steering import steer

from conftest import save_tiny_run, left_padded as _left_padded, perturbed_lora


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's matmuls gain nothing from threads and crawl when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = ["Q: What is the capital of France? A:", "Q: What happens if you eat a pomegranate?\nA:", "Yes"]


@torch.no_grad()
def _slow_steered_log_probs(model, ids, mask, mu, alpha=0.1):
    """Steered next-token log-probs from full warm and base forwards, in fp32 like ``generate``."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    warm = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    return torch.log_softmax(steer(torch.log_softmax(warm, -1), base, mu, alpha), -1)


@torch.no_grad()
def _slow_steered_beam_search(model, ids, mask, mu, num_beams, steps):
    """transformers' beam search without EOS, every beam recomputed from scratch at every step.

    Beam 0 starts at 0 and the others at −1e9 (so the first step expands one beam), the best
    ``2K`` candidates of the ``K × V`` continuations are kept and the best ``K`` of those continue;
    after ``steps`` tokens the final scores are divided by ``steps`` (length_penalty = 1).
    """
    B, K = ids.shape[0], num_beams
    seqs, masks = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    scores = torch.zeros(B, K)
    scores[:, 1:] = -1e9
    for _ in range(steps):
        lp = _slow_steered_log_probs(model, seqs, masks, mu)
        V = lp.shape[-1]
        cand = (scores[:, :, None] + lp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(2 * K)
        top, idx = top[:, :K], idx[:, :K]
        rows = (torch.arange(B)[:, None] * K + idx // V).view(-1)
        seqs = torch.cat([seqs[rows], (idx % V).view(-1, 1)], 1)
        masks = torch.cat([masks[rows], masks.new_ones(B * K, 1)], 1)
        scores = top
    return seqs.view(B, K, -1), scores / steps


@pytest.mark.parametrize("mu,early_stopping", [(-2.0, True), (3.0, False), (-1.0, "never")])
def test_steered_beam_search_matches_slow_reference(tokenizer, mu, early_stopping):
    model = perturbed_lora(dtype=torch.float64)
    ids, mask = _left_padded(tokenizer, PROMPTS)
    K, steps = 4, 10
    out = steered_generate(model, ids, mask, SteeringConfig(mu=mu), num_beams=K, num_return_sequences=K, do_sample=False,
                           max_new_tokens=steps, early_stopping=early_stopping, length_penalty=1.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=len(tokenizer) + 7,  # never generated
                           return_dict_in_generate=True, output_scores=True)
    seqs, scores = _slow_steered_beam_search(model, ids, mask, mu, K, steps)
    fast_seqs, fast_scores = out.sequences.view(len(PROMPTS), K, -1), out.sequences_scores.view(len(PROMPTS), K)
    live = scores > -1e8  # beams padded in by the −1e9 start (fewer kept tokens than beams) are arbitrary
    assert live[:, 0].all() and torch.equal(live, fast_scores > -1e8)
    assert torch.equal(fast_seqs[live], seqs[live])
    torch.testing.assert_close(fast_scores[live], scores[live], rtol=1e-5, atol=1e-5)
    plain = model.generate(input_ids=ids, attention_mask=mask, num_beams=K, do_sample=False, max_new_tokens=steps,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=len(tokenizer) + 7)
    assert not torch.equal(plain, fast_seqs[:, 0]), "steering should change some beam on this model"


class _CheckEveryRow(LogitsProcessor):
    """Runs right after the steering processor and records its scores; :meth:`verify` then compares
    them with a slow recomputation per row (after ``generate``: the one-forward path's per-row
    adapter hooks are active inside it)."""

    def __init__(self, model, mask, mu):
        self.model, self.mask, self.mu, self.seen = model, mask, mu, []

    def __call__(self, input_ids, scores):
        self.seen.append((input_ids.clone(), scores.clone()))
        return scores

    @property
    def calls(self) -> int:
        return len(self.seen)

    def verify(self) -> None:
        for input_ids, scores in self.seen:
            rows = input_ids.shape[0]
            prompt_mask = self.mask.repeat_interleave(rows // self.mask.shape[0], 0)
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, input_ids.shape[1] - prompt_mask.shape[1])], 1)
            slow = _slow_steered_log_probs(self.model, input_ids, mask, self.mu)
            torch.testing.assert_close(scores, slow, rtol=1e-5, atol=1e-5)  # also: −inf exactly where slow has −inf


@pytest.mark.parametrize("forward_mode", ["auto", "two_pass"])
@pytest.mark.parametrize("kw", [
    dict(num_beams=4, num_return_sequences=2, early_stopping=True, do_sample=False),
    dict(num_beams=3, do_sample=True, top_k=10),
    dict(num_return_sequences=3, do_sample=True, temperature=0.9, top_k=20),
], ids=["beam-eos", "beam-sample", "sample-x3"])
def test_processor_tracks_every_row(tokenizer, kw, forward_mode):
    model = perturbed_lora(dtype=torch.float64)
    ids, mask = _left_padded(tokenizer, PROMPTS)
    # An EOS the steered model actually emits, so beams finish at different lengths.
    eos = int(steered_generate(model, ids, mask, SteeringConfig(mu=-2.0), max_new_tokens=3, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, -1])
    check = _CheckEveryRow(model, mask, -2.0)
    run = lambda: steered_generate(model, ids, mask, SteeringConfig(mu=-2.0), forward_mode=forward_mode,  # noqa: E731
                                   max_new_tokens=8, logits_processor=[check], pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=eos, **kw)
    torch.manual_seed(0)
    out = run()
    assert check.calls > 1
    check.verify()
    n_out = kw.get("num_return_sequences", 1)
    assert out.shape[0] == len(PROMPTS) * n_out
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(n_out, 0))
    if kw["do_sample"]:
        torch.manual_seed(0)
        assert torch.equal(run(), out)
    if n_out == 3:
        assert any(len({tuple(r.tolist()) for r in out[i * 3 : i * 3 + 3]}) > 1 for i in range(len(PROMPTS)))
    if "early_stopping" in kw:
        assert (out[:, ids.shape[1] :] == eos).any(), "no beam finished: the EOS paths were not exercised"


# --------------------------------------------------------------------------------------------------
# The CLI.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory and the in-memory model it was saved from (LoRA A is randomly initialised)."""
    run, model = tmp_path_factory.mktemp("run"), perturbed_lora()
    save_tiny_run(model, run)
    return run, model


def _prompts_file(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _reference(model, tokenizer, prompts, batch_size, **kw):
    plain, steered = [], []
    for s in range(0, len(prompts), batch_size):
        ids, mask = _left_padded(tokenizer, prompts[s : s + batch_size])
        common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
        for answers, out in ((plain, model.generate(input_ids=ids, attention_mask=mask, **common)),
                             (steered, steered_generate(model, ids, mask, SteeringConfig(mu=-1.0, alpha=0.1), **common))):
            answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return plain, steered


def test_cli_greedy_end_to_end(tmp_path, run_dir, tokenizer):
    run_dir, model = run_dir
    prompts = PROMPTS + ["The capital of France is"]
    src = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(prompts)] + [""])
    out = tmp_path / "answers.jsonl"
    main(["--run-dir", str(run_dir), "--prompts", str(src), "--out", str(out),
          "--max-new-tokens", "8", "--batch-size", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not (tmp_path / "answers.jsonl.tmp").exists()
    assert [r["prompt"] for r in rows] == prompts
    assert all(set(r) == {"prompt", "plain", "steered", "mu", "mode"} for r in rows)
    assert all(r["mu"] == -1.0 and r["mode"] == "greedy" for r in rows)
    plain, steered = _reference(model, tokenizer, prompts, 3, max_new_tokens=8)
    assert [r["plain"] for r in rows] == plain
    assert [r["steered"] for r in rows] == steered
    assert plain != steered, "mu = -1 should change some answer on this model"


def test_generate_answers_modes(tokenizer):
    model, side = perturbed_lora(), tokenizer.padding_side
    kw = dict(max_new_tokens=5, batch_size=2, progress=False)
    beam = generate_answers(model, tokenizer, PROMPTS, SteeringConfig(mu=2.0), "beam", num_beams=2, **kw)
    assert [r["mode"] for r in beam] == ["beam"] * 3 and all(r["mu"] == 2.0 for r in beam)
    sample = lambda: generate_answers(model, tokenizer, PROMPTS, SteeringConfig(mu=2.0), "sample", top_k=20, seed=1, **kw)  # noqa: E731
    assert sample() == sample()
    assert tokenizer.padding_side == side  # left padding only while generating
    with pytest.raises(ValueError, match="only apply to mode 'sample'"):
        generate_answers(model, tokenizer, PROMPTS, SteeringConfig(mu=2.0), "greedy", temperature=0.5, **kw)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "ok"', "invalid JSON"),
    ('{"question": "no prompt"}', "non-empty string 'prompt'"),
    ('{"prompt": "  "}', "non-empty string 'prompt'"),
    ('["prompt"]', "non-empty string 'prompt'"),
])
def test_cli_rejects_bad_prompts(tmp_path, run_dir, capsys, line, message):
    run_dir = run_dir[0]
    src = _prompts_file(tmp_path / "bad.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        read_prompts(src)
    with pytest.raises(SystemExit) as err:
        main(["--run-dir", str(run_dir), "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert err.value.code == 2 and "bad.jsonl:2:" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_svd_lightning_generate_subcommand(tmp_path, run_dir, capsys):
    from svd_lightning.cli import main as cli_main

    run_dir = run_dir[0]
    src = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "beam.jsonl"
    cli_main(["generate", "--run-dir", str(run_dir), "--prompts", str(src), "--out", str(out),
              "--mode", "beam", "--num-beams", "2", "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and {r["mode"] for r in rows} == {"beam"}
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    assert "svd-lightning generate" in capsys.readouterr().out


@pytest.mark.parametrize("mode,option,value,message", [
    ("sample", "top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    ("sample", "top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("sample", "top_k", 0, "top_k must be an integer ≥ 1, got 0"),
    ("sample", "temperature", 0.0, "temperature must be a positive number, got 0.0"),
    ("beam", "num_beams", 0, "num_beams must be an integer ≥ 1, got 0"),
    ("greedy", "max_new_tokens", 0, "max_new_tokens must be an integer ≥ 1, got 0"),
])
def test_bad_decoding_options_are_refused(mode, option, value, message):
    from svd_lightning.generation import decoding_kwargs

    with pytest.raises(ValueError, match=message):
        decoding_kwargs(mode, **{option: value})


@pytest.mark.parametrize("flags,message", [
    (["--mode", "sample", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--out-dir"], "is a directory"),
    (["--mu", "1e300"], "is too large"),
])
def test_cli_refuses_bad_options_before_loading_the_model(tmp_path, run_dir, capsys, monkeypatch, flags, message):
    import svd_lightning.generate as generate

    monkeypatch.setattr(generate, "load_run", lambda *a: pytest.fail("the model was loaded before the check"))
    src = _prompts_file(tmp_path / "p.jsonl", [{"prompt": "fine"}])
    out = tmp_path if flags == ["--out-dir"] else tmp_path / "o.jsonl"
    flags = [] if flags == ["--out-dir"] else flags
    with pytest.raises(SystemExit) as err:
        main(["--run-dir", str(run_dir[0]), "--prompts", str(src), "--out", str(out), *flags])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_custom_generate_and_the_processor_steer_a_users_own_model_carrying_the_runs_adapter(tmp_path):
    """custom_generate and logits_processor(model=...) on the user's own PeftModel, loaded from the run's
    adapter/: the same steered tokens as on the run's own model; another adapter is refused with what to do."""
    from peft import PeftModel

    from svd_lightning import SteeredModel
    from svd_lightning.tiny import tiny_model_and_tokenizer

    from conftest import tiny_run

    run_dir, _ = tiny_run(tmp_path, mu=-2.0)
    sm = SteeredModel.from_run_dir(run_dir)
    tok = sm.tokenizer
    enc = tok(["Q: What is the capital of France?\nA:"], return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = sm.model.generate(**enc, custom_generate=sm.custom_generate, **kw)
    own = PeftModel.from_pretrained(tiny_model_and_tokenizer(0)[0], str(run_dir / "adapter")).eval()
    with torch.no_grad():
        before = own(**enc).logits
    assert torch.equal(own.generate(**enc, custom_generate=sm.custom_generate, **kw), expected)
    with torch.no_grad():
        assert torch.equal(own(**enc).logits, before)  # its adapter is switched back on after the pre-trained pass
    other, _ = tiny_run(tmp_path, name="other", mu=-2.0, seed=1)
    stranger = PeftModel.from_pretrained(tiny_model_and_tokenizer(0)[0], str(other / "adapter")).eval()
    with pytest.raises(ValueError, match="carries another one"):
        stranger.generate(**enc, custom_generate=sm.custom_generate, **kw)
    from transformers import LogitsProcessorList

    processed = own.generate(**enc, logits_processor=LogitsProcessorList([
        sm.logits_processor(enc["attention_mask"], model=own)]), **kw)
    assert torch.equal(processed, expected)
    with pytest.raises(ValueError, match="logits_processor steers with the run's adapter, and this PeftModel carries another"):
        sm.logits_processor(enc["attention_mask"], model=stranger)


def test_a_prompt_line_with_a_key_twice_and_a_full_disk_are_named(tmp_path, monkeypatch):
    import errno

    from svd_lightning import generate
    from svd_lightning.log import InputError

    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "Q: a?"}\n{"prompt": "Q: b?", "prompt": "Q: c?"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: duplicate key\(s\) \['prompt'\]"):
        read_prompts(src)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generate, "atomic_write_text", full)
    with pytest.raises(InputError, match=r"could not write .*answers.jsonl \(No space left on device\); nothing was written"):
        generate.write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "p", "steered": "s"}])
