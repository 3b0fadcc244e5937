"""docs/api.md: its Python blocks run in order, as one script, on a tiny run (where they expect the demo's)."""

import re

import pytest

from conftest import ROOT, tiny_run, write_truthfulqa

PAGE = ROOT / "docs" / "api.md"


@pytest.mark.slow
def test_every_block_of_the_api_reference_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the lm-eval extra (installed by scripts/install.sh and CI)")
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 7
    path, _ = tiny_run(tmp_path, gamma=0.5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "truthfulqa-lora").mkdir(parents=True)
    (tmp_path / "runs" / "truthfulqa-lora" / "version_0").symlink_to(path)
    write_truthfulqa(tmp_path / "mc_task.json")
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {i}", "exec"), namespace)
    assert set(namespace["scores"]) == {"plain", "base", "steered", "contrastive"}
    assert isinstance(namespace["answer"], str) and isinstance(namespace["contrastive"], str)
    assert (namespace["saved"] / "README.md").is_file() and namespace["again"].config == namespace["sm"].config
    assert namespace["module"].mu is not None and namespace["both"].choices is not None
    assert "library_name: peft" in capsys.readouterr().out


def test_the_reference_names_every_entry_point():
    import svd_lightning

    page = PAGE.read_text()
    entry_points = ["SteeredModel", "SteeringConfig", "score_choices", "steered_generate", "calibrate",
                    "calibrate_pass", "CalibrationNeeds", "SteeringLM", "StrengthSolver", "SteeredValidation",
                    "SteeringExtraction", "TruthfulQADataModule", "ChoiceExample", "save_pretrained",
                    "from_pretrained", "push_to_hub", "custom_generate", "logits_processor", "SteeredHFLM"]
    assert [n for n in entry_points if n not in page] == []
    assert all(n in svd_lightning.__all__ for n in entry_points[:13])


def test_the_public_api_is_twenty_names_each_in_the_reference_and_the_experimental_ones_named():
    import svd_lightning
    import svd_lightning.experimental as experimental

    page = PAGE.read_text()
    assert len(svd_lightning.__all__) <= 20
    assert [n for n in svd_lightning.__all__ if f"| `{n}` |" not in page] == []  # a row of the table each
    assert [n for n in experimental.__all__ if f"`{n}`" not in page] == []
    assert not set(svd_lightning.__all__) & set(experimental.__all__)
