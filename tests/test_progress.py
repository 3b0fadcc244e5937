"""Progress lines for logs: rate and ETA, at an interval, when stderr is not a terminal."""

import io

import pytest

from svd_lightning.progress import PlainProgress, progress_line, track

from conftest import ROOT, write_truthfulqa


def test_progress_line_has_count_rate_and_eta():
    line = progress_line("Calibration", 40, 160, 20.0, "batch")
    assert line == "Calibration: 40/160 batch (25.0%) | 2 batch/s | elapsed 0:20 | ETA 1:00"
    assert progress_line("Warm start", 5, None, 3725.0, "batch").endswith("elapsed 1:02:05")


def test_plain_progress_prints_at_the_interval_and_at_the_end():
    out = io.StringIO()
    bar = PlainProgress("Scoring", total=3, unit="batch", interval=0.0, stream=out)
    for _ in range(3):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["1/3 batch", "2/3 batch", "3/3 batch", "3/3 batch"]
    quiet = io.StringIO()
    bar = PlainProgress("Scoring", total=3, interval=3600.0, stream=quiet)
    bar.update()
    assert quiet.getvalue() == ""  # nothing before the interval...
    bar.close()
    assert quiet.getvalue().count("\n") == 1  # ...and one line at the end


def test_track_yields_everything(capsys):
    assert list(track(range(5), "Counting")) == list(range(5))
    assert "Counting: 5/5 it (100.0%)" in capsys.readouterr().err  # pytest's stderr is not a terminal


def test_fit_prints_progress_lines_when_piped(tmp_path, monkeypatch, capsys):
    from svd_lightning.cli import main

    monkeypatch.setenv("SVD_PROGRESS_SECONDS", "0")
    data = write_truthfulqa(tmp_path / "mc.json", n=10)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.init_args.path", str(data),
          "--trainer.default_root_dir", str(tmp_path / "runs" / "tiny")])
    err = capsys.readouterr().err
    for stage in ("Warm start, epoch 0", "Calibration", "Validation", "Test"):
        assert f"{stage}" in err and "ETA" in err, stage
    assert "\r" not in err  # no tqdm redraws in a log file


@pytest.mark.parametrize("value", ["abc", "-1", "inf"])
def test_a_bad_progress_interval_names_the_variable(monkeypatch, value):
    from svd_lightning.progress import interval_seconds

    monkeypatch.setenv("SVD_PROGRESS_SECONDS", value)
    with pytest.raises(ValueError, match=f"SVD_PROGRESS_SECONDS must be a number of seconds ≥ 0, got '{value}'"):
        interval_seconds()
