"""Every example runs in its --fast mode and documents its options in --help."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["registration_denoising.py", "toy_1d.py", "digits_similarity.py"]


def _run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script", EXAMPLES)
def test_help_documents_the_options(script, tmp_path):
    out = _run(script, "--help", cwd=tmp_path)
    assert "--fast" in out and "usage" in out


@pytest.mark.slow
def test_registration_denoising_fast(tmp_path):
    out = _run("registration_denoising.py", "--fast", "--logdir", str(tmp_path / "runs"), cwd=tmp_path)
    for row in ("label-noise RMS", "network RMSE", "ratio", "mean denoising factor", "predicted error", "measured error", "correlation"):
        assert row in out, row
    assert "tensorboard --logdir" in out
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and (tmp_path / "runs" / "registration_denoising" / "version_0" / "projector_config.pbtxt").exists()


@pytest.mark.slow
def test_toy_1d_fast(tmp_path):
    out = _run("toy_1d.py", "--fast", "--out", str(tmp_path / "toy.png"), "--logdir", str(tmp_path / "runs"), cwd=tmp_path)
    lines = [line.split() for line in out.splitlines() if len(line.split()) == 5 and line.split()[0].isdigit()]
    assert [int(row[0]) for row in lines] == [1, 4]
    densities = [float(row[2]) for row in lines]
    assert all(0 < n <= 200 + 1e-6 for n in densities)  # N = 200 examples, self included
    pytest.importorskip("matplotlib")
    assert (tmp_path / "toy.png").stat().st_size > 1000


@pytest.mark.slow
def test_digits_similarity_fast(tmp_path):
    pytest.importorskip("sklearn")
    out = _run("digits_similarity.py", "--fast", "--out", str(tmp_path / "d.png"), "--logdir", str(tmp_path / "runs"), cwd=tmp_path)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["10"], ["20"])]
    assert [int(r[0]) for r in rows] == [10, 20]
    accuracies = [float(r[i]) for r in rows for i in (1, 4, 7)]  # mean accuracy of the three arms
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
