"""Two CPU processes (gloo DDP) log what one process logs, with validation sets not divisible by 2."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_netsim import DensityMonitor
from tests.ddp import run_two_ranks
from tests.lightning_helpers import BlobData, Classifier, read_events, trainer_kwargs


def _density_run(tmp_path, name: str, devices: int, max_samples: int) -> None:
    torch.manual_seed(0)
    model = Classifier()
    logger = TensorBoardLogger(str(tmp_path), name=name, version=0)
    extra = {"strategy": "ddp"} if devices > 1 else {}
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=max_samples, output="target")],
        logger=logger,
        **trainer_kwargs(tmp_path, devices=devices, **extra),
    )
    trainer.validate(model, datamodule=BlobData(n_val=101, batch_size=8), verbose=False)


def _validate(tmp_path, name: str, devices: int, max_samples: int) -> dict:
    if devices > 1:
        run_two_ranks(_density_run, tmp_path, name, devices, max_samples)
    else:
        _density_run(tmp_path, name, devices, max_samples)
    scalars, histograms = read_events(tmp_path / name)
    return {"scalars": {k: v for k, v in scalars.items() if k.startswith("netsim")}, "histograms": histograms}


@pytest.mark.slow
@pytest.mark.parametrize("max_samples", [1024, 50])
def test_two_processes_log_what_one_process_logs(tmp_path, max_samples):
    one = _validate(tmp_path, "one", 1, max_samples)
    two = _validate(tmp_path, "two", 2, max_samples)
    assert one["scalars"].keys() == two["scalars"].keys() and "netsim/density/class_2" in one["scalars"]
    for tag, values in one["scalars"].items():
        assert len(values) == len(two["scalars"][tag]) == 1, tag
        # float32 sums in another order: densities are O(N) sums of cosines
        assert two["scalars"][tag][0][1] == pytest.approx(values[0][1], rel=1e-5, abs=1e-4), (tag, values, two["scalars"][tag])
    h1, h2 = one["histograms"]["netsim/density"][0].histogram_value, two["histograms"]["netsim/density"][0].histogram_value
    assert h1.num == h2.num == min(101, max_samples)
    assert h2.sum == pytest.approx(h1.sum, rel=1e-5)


def _images_run(tmp_path, name: str, devices: int) -> None:
    from lightning_netsim import DenoisingMonitor, NeighborMonitor
    from tests.lightning_helpers import ImageClassifier, ImageData

    torch.manual_seed(0)
    model = ImageClassifier()
    logger = TensorBoardLogger(str(tmp_path), name=name, version=0)
    extra = {"strategy": "ddp"} if devices > 1 else {}
    monitors = [NeighborMonitor(num_queries=3, k=4, max_samples=33, matrix_size=12), DenoisingMonitor(noise_std=1.0, max_samples=33)]
    trainer = pl.Trainer(callbacks=monitors, logger=logger, **trainer_kwargs(tmp_path, devices=devices, **extra))
    trainer.validate(model, datamodule=ImageData(n_val=41, batch_size=4), verbose=False)


def _validate_images(tmp_path, name: str, devices: int) -> dict:
    if devices > 1:
        run_two_ranks(_images_run, tmp_path, name, devices)
    else:
        _images_run(tmp_path, name, devices)
    scalars, _ = read_events(tmp_path / name)
    return {k: v for k, v in scalars.items() if k.startswith("netsim")}


@pytest.mark.slow
def test_neighbor_and_denoising_monitors_two_processes_equal_one(tmp_path):
    one, two = _validate_images(tmp_path, "one", 1), _validate_images(tmp_path, "two", 2)
    expected = {"netsim/denoising/mean", "netsim/consistency/mean", "netsim/similarity/intra_class", "netsim/uncertainty/mean"}
    assert expected <= one.keys() and one.keys() == two.keys()
    for tag, values in one.items():
        assert two[tag][0][1] == pytest.approx(values[0][1], rel=1e-4, abs=1e-5), (tag, values, two[tag])
