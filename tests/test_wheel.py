"""The package as a user installs it: a wheel (not editable), run from an empty folder with nothing beside it."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_wheel_runs_the_tiny_quick_start_from_an_empty_folder(tmp_path):
    src = tmp_path / "src"  # build from a copy: a build leaves build/ and *.egg-info where it runs
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "svd_lightning", src / "svd_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, **kw)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src))
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("svd_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("svd_lightning/configs/tiny.yaml", "svd_lightning/configs/_base/smollm2.yaml",
                    "svd_lightning/configs/paper/llama-3.1-8b-lora.yaml", "svd_lightning/data/samples/truthfulqa_mc_40.json"):
        assert shipped in names, shipped
    site = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SVD_LIGHTNING_DATA"} | {"PYTHONPATH": str(site)}
    where = run(sys.executable, "-c", "import svd_lightning; print(svd_lightning.__file__)", cwd=empty, env=env)
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not this checkout
    fit = run(sys.executable, "-m", "svd_lightning.cli", "fit", "--config", "tiny", "--trainer.enable_progress_bar", "false",
              cwd=empty, env=env, timeout=600)
    assert fit.returncode == 0, fit.stderr[-4000:]
    run_dir = empty / "runs" / "tiny" / "version_0"
    assert (run_dir / "steering.json").exists() and (run_dir / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing else written beside it
    parsed = run(sys.executable, "-m", "svd_lightning.cli", "fit", "--config", "truthfulqa/lora", "--print_config",
                 cwd=empty, env=env)
    assert parsed.returncode == 0, parsed.stderr[-2000:]  # parses by name; its data is found when it runs
    # the shared data is not beside an installed package: one line naming the setting, no traceback
    missing = run(sys.executable, "-m", "svd_lightning.cli", "fit", "--config", "tiny", "--data.init_args.path",
                  "../shared/data/truthfulqa/v1_2021/mc_task.json", cwd=empty, env=env, timeout=600)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "SVD_LIGHTNING_DATA" in missing.stderr and "--data.init_args.path" in missing.stderr
