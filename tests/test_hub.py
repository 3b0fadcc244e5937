"""A run where our users already work: saved and loaded as a Hugging Face artifact with a model card,
and steering from plain ``transformers.generate`` (custom_generate, a LogitsProcessor) with the tokens
of ``SteeredModel.generate``. No network: the Hub is a local cache read with HF_HUB_OFFLINE=1."""

import json
import threading

import pytest
import torch
from transformers import LogitsProcessorList, TextIteratorStreamer

from svd_lightning import SteeredModel
from svd_lightning.card import model_card
from svd_lightning.run import RunError, SteeringRun

from conftest import left_padded, perturbed_lora, save_tiny_run

PROMPTS = ["Q: What is the capital of France? A:", "Q: Why?\nA:"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_tiny_run(perturbed_lora(), tmp_path_factory.mktemp("hub") / "run", mu=-2.0, gamma=1.5, alpha=0.2)


@pytest.fixture(scope="module")
def steered(run_dir):
    return SteeredModel.from_run_dir(run_dir)


def _same_model(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_save_pretrained_writes_a_run_with_a_card_that_loads_back(steered, tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"history": [{
        "stage": "test", "step": 12, "test/mc1_plain": 0.25, "test/mc1_steered": 0.5, "test/mc1_base": 0.2,
        "paired_bootstrap": {"mc1_steered_minus_plain": {"metric": "mc1", "method": "steered", "reference": "plain",
                                                         "mean": 0.25, "ci_low": -0.05, "ci_high": 0.5,
                                                         "questions": 8}}}]}))
    steered.run_dir = str(tmp_path)  # a source run that scored a split: its results go on the card
    try:
        saved = steered.save_pretrained(tmp_path / "shared")
    finally:
        steered.run_dir = None
    assert {p.name for p in saved.iterdir()} >= {"adapter", "steering.json", "README.md", "metrics.json"}
    card = (saved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- svdecode" in card
    for fact in ("`tiny-random`", "μ̄ (steering strength) | -2,", "| 0.2, `mask_generation_only`", "| 1.5, fit",
                 "| mc1 | 20.00 | 25.00 | 50.00 |", "| mc1 | +SVDecode − warm start | +25.00 | [-5.00, +50.00] | 8 |",
                 'SteeredModel.from_pretrained("path/to/this/run")'):
        assert fact in card, fact
    from huggingface_hub import ModelCard

    data = ModelCard.load(saved / "README.md").data  # the metadata as the Hub reads it
    assert data.library_name == "peft" and "svdecode" in data.tags and data.base_model is None  # tiny-random: no hub id
    results = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert results == {("mc1", "mc1 (warm start)"): 0.25, ("mc1", "mc1 (+SVDecode)"): 0.5}
    assert {r.dataset_name for r in data.eval_results} == {"the run's test split"}
    again = SteeredModel.from_pretrained(saved)
    assert again.config == steered.config and _same_model(again, steered)
    # A second save never writes into the finished run: it takes the next free name.
    assert steered.save_pretrained(saved) != saved and (saved / "README.md").read_text() == card


def test_every_written_run_has_its_card(run_dir):
    card = (run_dir / "README.md").read_text()
    assert card == model_card(SteeringRun.load(run_dir))
    assert "No split was scored" in card


def test_from_pretrained_reads_a_hub_repo_from_the_cache_offline(steered, run_dir, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout (refs/main -> snapshots/<commit>)."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--svd-run"
    shutil.copytree(run_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    loaded = SteeredModel.from_pretrained("someone/svd-run")
    assert loaded.config == steered.config and _same_model(loaded, steered)
    with pytest.raises(RunError, match="'someone/other' .* not in the local cache"):
        SteeredModel.from_pretrained("someone/other")
    with pytest.raises(RunError, match="neither a run directory nor a Hub repo id"):
        SteeredModel.from_pretrained("no/such/dir/anywhere")


def test_push_to_hub_uploads_the_saved_run(steered, monkeypatch):
    from huggingface_hub import HfApi

    seen = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: seen.setdefault("created", repo_id))

    def upload_folder(self, repo_id, folder_path, commit_message):
        seen["files"] = sorted(p.name for p in folder_path.iterdir())
        seen["card"] = (folder_path / "README.md").read_text()
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert steered.push_to_hub("me/run").endswith("/commit/1")
    assert seen["created"] == "me/run" and seen["files"] == ["README.md", "adapter", "steering.json"]
    assert 'SteeredModel.from_pretrained("me/run")' in seen["card"]


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_plain_transformers_generate_steers_with_the_tokens_of_steered_model(steered, mode):
    """custom_generate= and logits_processor= in the user's own generate call give SteeredModel.generate's
    tokens, on both forward modes of SteeredModel (LoRA: one forward by default)."""
    tok, model = steered.tokenizer, steered.model
    ids, mask = left_padded(tok, PROMPTS)
    options = dict(max_new_tokens=6, do_sample=mode == "sample", pad_token_id=tok.pad_token_id,
                   **({"top_k": 20, "temperature": 0.8} if mode == "sample" else {}))
    expected = {}
    for forward in ("one_forward", "two_pass"):
        sm = SteeredModel(model, tok, steered.config, gamma=steered.gamma, forward_mode=forward)
        kw = {"top_k": 20, "temperature": 0.8} if mode == "sample" else {}
        expected[forward] = sm.generate(PROMPTS, mode, max_new_tokens=6, seed=3, **kw)
    assert expected["one_forward"] == expected["two_pass"]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        torch.manual_seed(3)
        out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=steered.custom_generate, **options)
        torch.manual_seed(3)
        with_processor = model.generate(input_ids=ids, attention_mask=mask, **options,
                                        logits_processor=LogitsProcessorList([steered.logits_processor(mask)]))
        torch.manual_seed(3)
        plain = model.generate(input_ids=ids, attention_mask=mask, **options)
    finally:
        tok.padding_side = side
    decode = lambda o: tok.batch_decode(o[:, ids.shape[1]:], skip_special_tokens=True)  # noqa: E731
    assert decode(out) == decode(with_processor) == expected["two_pass"]
    assert decode(plain) != decode(out), "steering should change these answers"


def test_custom_generate_refuses_another_model(steered):
    other = perturbed_lora(seed=5)
    ids, mask = left_padded(steered.tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="custom_generate steers"):
        other.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, custom_generate=steered.custom_generate)


def test_generate_passes_transformers_options_through_and_streams(steered):
    from svd_lightning.generation import steered_generate

    tok = steered.tokenizer
    ids, mask = left_padded(tok, PROMPTS[:1])
    options = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id, do_sample=False, num_beams=1)
    base = steered.generate(PROMPTS[0], max_new_tokens=8)
    base_ids = steered_generate(steered.model, ids, mask, steered.config, **options)[0, ids.shape[1]:]
    penalised = steered.generate(PROMPTS[0], max_new_tokens=8, repetition_penalty=5.0, no_repeat_ngram_size=1)
    new_ids = steered_generate(steered.model, ids, mask, steered.config, repetition_penalty=5.0,
                               no_repeat_ngram_size=1, **options)[0, ids.shape[1]:]
    assert penalised == tok.decode(new_ids, skip_special_tokens=True) != base
    assert len(base_ids.unique()) < len(base_ids), "the unpenalised answer repeats a token (else this checks nothing)"
    assert len(new_ids.unique()) == len(new_ids), "no_repeat_ngram_size=1 repeats no token"
    stop = int(base_ids[len(base_ids) // 2])
    first = int((base_ids == stop).nonzero()[0])  # generation ends once the stop token is produced
    assert first < len(base_ids) - 1
    stopped = steered.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=stop)
    assert stopped == tok.decode(base_ids[: first + 1], skip_special_tokens=True)
    with pytest.raises(ValueError, match="set by the mode"):
        steered.generate(PROMPTS[0], do_sample=True)
    with pytest.raises(ValueError, match="not used by the model"):
        steered.generate(PROMPTS[0], max_new_tokens=2, not_an_option=1)
    for forward in ("one_forward", "two_pass"):
        sm = SteeredModel(steered.model, steered.tokenizer, steered.config, gamma=steered.gamma, forward_mode=forward)
        streamer = TextIteratorStreamer(sm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("text", sm.generate(PROMPTS[0], max_new_tokens=8,
                                                                                       streamer=streamer)))
        worker.start()
        streamed = "".join(streamer)
        worker.join()
        assert streamed == result["text"] == base, forward


def test_dtype_is_float32_unless_asked(run_dir):
    assert next(SteeredModel.from_run_dir(run_dir).model.parameters()).dtype == torch.float32
    half = SteeredModel.from_run_dir(run_dir, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert set(half.score("Q: Is the sky blue?\nA:", [" Yes", " No"])) == {"plain", "base", "steered", "contrastive"}
    with pytest.raises(ValueError, match="dtype must be one of"):
        SteeredModel.from_run_dir(run_dir, dtype="fp8")


def test_the_cards_license_is_the_base_models_own_read_where_its_card_is_here(tmp_path, monkeypatch):
    """A local model folder's README.md, the Hub cache's (nothing fetched), our SmolLM2 alias; else none."""
    from svd_lightning.card import base_license

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_license(str(folder)) == "mit"
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--base" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    (cache / "models--someone--base" / "refs").mkdir()
    (cache / "models--someone--base" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert base_license("someone/base") == "llama3.1"
    assert base_license("someone/not-cached") is None and base_license("tiny-random") is None
    assert base_license("smollm2-135m") == "apache-2.0"


def test_the_cards_datasets_are_the_tasks_hub_datasets(tmp_path, monkeypatch):
    """TruthfulQA's own id, and a load_dataset spec's, in the metadata of the card a fit writes."""
    from huggingface_hub import ModelCard

    from svd_lightning.data import GenericChoiceDataModule, TruthfulQADataModule

    from conftest import cli_tiny_fit

    run, _ = cli_tiny_fit(tmp_path, monkeypatch)
    data = ModelCard.load(run / "README.md").data
    assert data.datasets == ["truthfulqa/truthful_qa"] and data.license is None  # tiny-random states none
    assert TruthfulQADataModule().datasets() == ["truthfulqa/truthful_qa"]
    rows = tmp_path / "qa.json"
    rows.write_text(json.dumps([{"question": f"q{i}?", "choices": ["a", "b"], "label": 0} for i in range(10)]))
    spec = GenericChoiceDataModule({"path": "json", "data_files": str(rows), "split": "train"})
    spec.prepare_data()
    assert spec.datasets() == []  # a local builder, no Hub dataset
    monkeypatch.setattr("datasets.load_dataset", lambda **kw: __import__("datasets").Dataset.from_list(json.loads(rows.read_text())))
    hub = GenericChoiceDataModule({"path": "someone/qa", "split": "train"})
    hub.prepare_data()
    assert hub.datasets() == ["someone/qa"]


def test_save_pretrained_refuses_what_could_not_be_loaded_and_keeps_scores_only_at_their_settings(tmp_path):
    """An empty directory name, a model whose adapter records no base model, and a run saved at another μ
    (its scores were measured at the run's μ̄: not copied, and the strength is marked as set by hand)."""
    run = save_tiny_run(perturbed_lora(), tmp_path / "run")
    (run / "metrics.json").write_text(json.dumps({"history": []}))
    steered = SteeredModel.from_run_dir(run)
    with pytest.raises(ValueError, match="the run's directory is empty"):
        steered.save_pretrained("")
    assert (steered.save_pretrained(tmp_path / "same") / "metrics.json").is_file()
    other = SteeredModel.from_run_dir(run, mu=0.0).save_pretrained(tmp_path / "mu0")
    assert not (other / "metrics.json").exists()
    assert SteeringRun.load(other).solver.strength == "fixed" and SteeringRun.load(other).steering.mu == 0.0
    two_pass = SteeredModel.from_run_dir(run, forward_mode="two_pass").save_pretrained(tmp_path / "two_pass")
    assert (two_pass / "metrics.json").is_file()  # how the scores are computed changes nothing of them
    bare = SteeredModel(steered.model, steered.tokenizer, steered.config)
    bare.model.peft_config[bare.model.active_adapter].base_model_name_or_path = None
    with pytest.raises(RunError, match="does not record its base model"):
        bare.save_pretrained(tmp_path / "bare")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mu0", "run", "same", "two_pass"]  # no partial folder left


@pytest.mark.parametrize("fault", ["disk_full", "read_only", "bad_metrics"])
def test_a_failed_save_names_the_run_and_leaves_nothing_behind(tmp_path, monkeypatch, fault):
    """Disk full (an injected ENOSPC), an unwritable folder, or the source run's metrics.json broken: a clear
    error naming the target (or the file), no .partial folder, nothing at the target."""
    import errno

    from svd_lightning.run import writer as run_writer

    run = save_tiny_run(perturbed_lora(), tmp_path / "run")
    steered = SteeredModel.from_run_dir(run)
    out = tmp_path / "out"
    out.mkdir()
    if fault == "disk_full":
        def full(path, data, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(run_writer, "atomic_write_text", full)
        match = "could not write .* of run .*No space left on device"
    elif fault == "read_only":
        def refused(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(out))
        monkeypatch.setattr(run_writer.RunWriter, "directory", refused)
        match = "could not write .*Permission denied"
    else:
        (run / "metrics.json").write_text('{"history": [')
        match = "metrics.json"
    with pytest.raises((RunError, ValueError), match=match):
        steered.save_pretrained(out / "saved")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["reused", "mask_of_other_prompts", "left_padded_without_mask", "other_tokenizer",
                                  "other_model", "adapter_switched_off"])
def test_the_processor_and_the_scorer_refuse_a_batch_they_were_not_made_for(tmp_path, case):
    """A processor serves the one generate call, prompts, mask and model it was made for (another model with the
    same vocabulary, or the run's own with its adapter off, is refused: its scores are not the warm model's); ids
    of another tokenizer are named as such, not an IndexError inside the embedding."""
    from svd_lightning.scoring import paired_label_logits

    steered = SteeredModel.from_run_dir(save_tiny_run(perturbed_lora(), tmp_path / "run"))
    tok, model = steered.tokenizer, steered.model
    ids, mask = left_padded(tok, ["Q: Why is the sky blue?\nA:", "Q: Why?\nA:"])
    generate = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    if case == "reused":
        processor = steered.logits_processor(mask)
        model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), **generate)
        call = lambda: model.generate(input_ids=ids, attention_mask=mask,  # noqa: E731
                                      logits_processor=LogitsProcessorList([processor]), **generate)
        message = "already served another generate call"
    elif case == "mask_of_other_prompts":
        processor = steered.logits_processor(mask[:, 1:])
        call = lambda: model.generate(input_ids=ids, attention_mask=mask,  # noqa: E731
                                      logits_processor=LogitsProcessorList([processor]), **generate)
        message = "give the mask of these prompts"
    elif case == "left_padded_without_mask":
        processor = steered.logits_processor()
        call = lambda: model.generate(input_ids=ids, attention_mask=mask,  # noqa: E731
                                      logits_processor=LogitsProcessorList([processor]), **generate)
        message = "left-padded and no attention_mask was given"
    elif case == "other_model":
        stranger = perturbed_lora(seed=7)  # the same vocabulary, other weights
        processor = steered.logits_processor(mask)
        call = lambda: stranger.generate(input_ids=ids, attention_mask=mask,  # noqa: E731
                                         logits_processor=LogitsProcessorList([processor]), **generate)
        message = "generate's scores are not this processor's model's"
    elif case == "adapter_switched_off":
        processor = steered.logits_processor(mask)

        def call():
            with model.disable_adapter():
                model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]),
                               **generate)
        message = "adapter switched off"
    else:
        batch = {"input_ids": torch.tensor([[1, 2, 10**6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                 "labels": torch.tensor([[-100, 2, 3]])}
        call = lambda: paired_label_logits(model, batch)  # noqa: E731
        message = "outside the model's vocabulary"
    with pytest.raises(ValueError, match=message):
        call()
    assert steered.generate(["Q: Why?\nA:"], max_new_tokens=2)  # the model is left usable


def test_a_damaged_adapter_with_a_recomputed_hash_names_the_run(tmp_path):
    from svd_lightning.run import adapter_hash, load_run

    run = save_tiny_run(perturbed_lora(), tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    record = json.loads((run / "steering.json").read_text())
    record["adapter_sha256"] = adapter_hash(run / "adapter")  # whoever damaged it fixed the hash too
    (run / "steering.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"adapter/ cannot be read \(SafetensorError.*damaged"):
        load_run(run)


def test_push_to_hub_without_network_names_the_repo_and_says_nothing_was_uploaded(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(self, *a, **k):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    steered = SteeredModel.from_run_dir(save_tiny_run(perturbed_lora(), tmp_path / "run"))
    with pytest.raises(RunError, match=r"push_to_hub 'me/run': the Hub could not be reached.*nothing was uploaded"):
        steered.push_to_hub("me/run", token="x")
