"""A real TensorBoard server serves what DensityMonitor wrote, through its HTTP data API."""

import json
import time
import urllib.parse
import urllib.request

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_netsim import DensityMonitor
from tests.lightning_helpers import BlobData, Classifier, trainer_kwargs


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_tensorboard_server_serves_density_scalars_and_histogram(tmp_path):
    from tensorboard import program

    pl.seed_everything(0)
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=32)],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        **trainer_kwargs(tmp_path, max_epochs=2),
    )
    trainer.fit(Classifier(), datamodule=BlobData())

    board = program.TensorBoard()
    board.configure(
        argv=[None, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", "0", "--load_fast", "false", "--reload_interval", "1"]
    )
    base = board.launch()  # an OS-chosen port
    query = lambda plugin, tag: f"{base}data/plugin/{plugin}/{plugin}?" + urllib.parse.urlencode(  # noqa: E731
        {"run": "tb/version_0", "tag": tag}
    )
    deadline = time.monotonic() + 60
    while "tb/version_0" not in _get(base + "data/runs"):
        assert time.monotonic() < deadline, "TensorBoard did not load the run"
        time.sleep(0.5)
    scalars = _get(query("scalars", "netsim/density/mean"))  # [[wall_time, step, value], ...]
    histograms = _get(query("histograms", "netsim/density"))  # [[wall_time, step, buckets], ...]
    assert len(scalars) == 2 and all(value > 0 for _, _, value in scalars)
    assert [step for _, step, _ in scalars] == [step for _, step, _ in histograms]
    assert scalars[-1][1] == trainer.global_step
    buckets = histograms[-1][2]  # [[left, right, count], ...]
    assert sum(count for _, _, count in buckets) == pytest.approx(32)
