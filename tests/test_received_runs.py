"""A run from someone else is safe to load: nothing it names runs as code, no path it names is read or
written without the user's say, the model cache cannot be poisoned by a file's name, and its files are its
own (no links out, no key given twice)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svd_lightning import gguf, models, tiny
from svd_lightning.api import SteeredModel
from svd_lightning.log import InputError
from svd_lightning.run import RUN_FILE, RunError, SteeringRun, load_run

from conftest import tiny_run

MARKER = "remote-code-ran"


def _edit(run: Path, **changes) -> Path:
    payload = json.loads((run / RUN_FILE).read_text())
    payload.update(changes)
    (run / RUN_FILE).write_text(json.dumps(payload))
    return run


@pytest.fixture
def remote_code_model(tmp_path) -> Path:
    """A model folder whose config asks transformers to import its own modules; importing them writes a
    marker file (what an attacker's code could do instead)."""
    folder = tmp_path / "evil-model"
    folder.mkdir()
    code = f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(code)
    (folder / "tokenization_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return folder


@pytest.mark.parametrize("load", ["model", "tokenizer", "run", "run_cli"])
def test_no_model_code_runs_whatever_a_run_or_source_names(tmp_path, remote_code_model, monkeypatch, load):
    """trust_remote_code is False everywhere: the folder's code never runs (no prompt on stdin either), and
    the error names the setting that would allow it."""
    monkeypatch.setenv("SVD_LIGHTNING_MODEL_DIRS", str(tmp_path))  # the path rule allows the folder: code is the test
    monkeypatch.delenv(models.TRUST_REMOTE_CODE_ENV, raising=False)
    if load == "model":
        with pytest.raises(InputError, match=models.TRUST_REMOTE_CODE_ENV):
            models.load_causal_lm(remote_code_model)
    elif load == "tokenizer":
        with pytest.raises(InputError, match=models.TRUST_REMOTE_CODE_ENV):
            models.load_tokenizer(remote_code_model)
    else:
        run = _edit(tiny_run(tmp_path)[0], model=str(remote_code_model))
        if load == "run":
            with pytest.raises(RunError, match=f"field 'model'.*{models.TRUST_REMOTE_CODE_ENV}"):
                SteeredModel.from_run_dir(run)
        else:  # the CLI with "y" waiting on stdin, as a prompt would read it
            prompts = tmp_path / "p.jsonl"
            prompts.write_text('{"prompt": "Q: Why?"}\n')
            out = subprocess.run([sys.executable, "-m", "svd_lightning.entry", "generate", "--run-dir", str(run),
                                  "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl")],
                                 input="y\ny\n", capture_output=True, text=True, timeout=300)
            assert out.returncode != 0 and models.TRUST_REMOTE_CODE_ENV in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("named", ["/etc", "../../..", "~", "elsewhere/model.gguf", "local-folder"])
def test_a_runs_local_base_model_loads_only_where_the_user_says(tmp_path, monkeypatch, named):
    """A run naming a local path is refused before anything is read or written (no GGUF conversion into the
    cache), with the three ways to allow it; each of them then loads the run."""
    monkeypatch.setenv("SVD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SVD_LIGHTNING_MODEL_DIRS", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "local-folder"
    model, tokenizer = tiny.tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.gguf").write_bytes(b"GGUF")
    run = _edit(tiny_run(tmp_path)[0], model=named)
    with pytest.raises(RunError, match=r"field 'model' names a local path.*base_model=PATH.*SVD_LIGHTNING_MODEL_DIRS"):
        load_run(run)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    loaded = SteeredModel.from_run_dir(run, base_model=folder)  # the user names the base model
    assert loaded.run.model == named
    if named == "local-folder":
        monkeypatch.setenv("SVD_LIGHTNING_MODEL_DIRS", str(tmp_path))  # or allows its folder
        load_run(run)


def test_hub_ids_and_aliases_are_not_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not models.is_local_source("tiny-random") and not models.is_local_source("smollm2-135m")
    assert not models.is_local_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct").mkdir(parents=True)  # a folder spelled like a Hub id
    assert models.is_local_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert all(models.is_local_source(p) for p in ["/etc", "~", "../x", "./x", "a/b/c", "x.gguf"])


def test_the_gguf_cache_is_keyed_by_content_not_by_name(tmp_path, monkeypatch):
    """A 17-byte file named like a converted GGUF gets its own conversion, never the cached model's."""
    monkeypatch.setenv("SVD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(path, out_dir):
        converted.append(path.read_bytes())
        model, tokenizer = tiny.tiny_model_and_tokenizer()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    real, fake = tmp_path / "a" / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "b" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for path, body in ((real, b"GGUF the real one"), (fake, b"GGUF poisoned....")):
        path.parent.mkdir()
        path.write_bytes(body)
    first, second = models.converted_gguf_dir(real), models.converted_gguf_dir(fake)
    assert first != second and first.name.startswith(real.stem) and converted == [real.read_bytes(), fake.read_bytes()]
    assert models.converted_gguf_dir(real) == first and len(converted) == 2  # the same content: reused


@pytest.mark.parametrize("link", ["adapter", "adapter_file", "steering_json"])
def test_a_run_whose_files_link_out_of_it_is_refused(tmp_path, link):
    run, _ = tiny_run(tmp_path)
    other, _ = tiny_run(tmp_path, name="other", seed=1)
    if link == "adapter":
        target = tmp_path / "outside-adapter"
        (run / "adapter").rename(target)
        (run / "adapter").symlink_to(target)
    elif link == "adapter_file":
        weights = run / "adapter" / "adapter_model.safetensors"
        weights.unlink()
        weights.symlink_to(other / "adapter" / "adapter_model.safetensors")
    else:
        (run / RUN_FILE).unlink()
        (run / RUN_FILE).symlink_to(other / RUN_FILE)
    with pytest.raises(RunError, match="symbolic link.*copy the file in"):
        SteeringRun.load(run)


@pytest.mark.parametrize("key", ["model", "adapter_sha256", "format_version"])
def test_a_steering_json_with_a_key_given_twice_is_refused(tmp_path, key):
    run, _ = tiny_run(tmp_path)
    text = (run / RUN_FILE).read_text()
    value = json.dumps(json.loads(text)[key])
    (run / RUN_FILE).write_text(text.replace("{", "{" + f'"{key}": {value}, ', 1))
    with pytest.raises(RunError, match=f"duplicate key.*{key}"):
        SteeringRun.load(run)


@pytest.mark.parametrize("logger", ["CSVLogger", "TensorBoardLogger"])
def test_a_logger_pinned_to_a_finished_run_is_refused_and_the_run_stays_as_it_was(tmp_path, monkeypatch, capsys, logger):
    from conftest import cli_tiny_fit
    from svd_lightning.cli import main

    if logger == "TensorBoardLogger":
        pytest.importorskip("tensorboard")
    run, common = cli_tiny_fit(tmp_path, monkeypatch)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    pinned = ["--trainer.logger", f"lightning.pytorch.loggers.{logger}", "--trainer.logger.init_args.save_dir",
              str(run.parent.parent), "--trainer.logger.init_args.name", run.parent.name,
              "--trainer.logger.init_args.version", "0"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "tiny", *common, *pinned])
    assert exit_.value.code != 0
    assert f"{logger} would write into" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
