"""Every example runs in its --fast mode and documents its options in --help."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["registration_denoising.py", "quickstart.py"]


def _run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script", [s for s in EXAMPLES if s != "quickstart.py"])
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
