"""NeighborMonitor and DenoisingMonitor on a small image classifier: images, tables, projector, scalars."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_netsim import (
    DenoisingMonitor,
    NeighborMonitor,
    class_similarity,
    denoising_factor,
    nearest_neighbors,
    neighbor_consistency,
    predicted_noise,
)
from lightning_netsim.callbacks._render import TILE
from tests.lightning_helpers import ImageClassifier, ImageData, image_blobs, trainer_kwargs


def _images_and_texts(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, texts, scalars = {}, {}, {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)
        for tag in acc.Tags()["tensors"]:
            texts[tag] = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
    return images, texts, scalars


def _validate(tmp_path, callbacks, n_val=40):
    model = ImageClassifier().eval()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path))
    trainer.validate(model, datamodule=ImageData(n_val=n_val, batch_size=8), verbose=False)
    return model, trainer, tmp_path / "tb" / "version_0"


def test_neighbor_monitor_writes_grid_table_heatmap_projector_and_class_scalars(tmp_path):
    monitor = NeighborMonitor(num_queries=3, k=4, matrix_size=10, max_samples=30)
    model, trainer, log_dir = _validate(tmp_path, [monitor])
    images, texts, scalars = _images_and_texts(log_dir)
    grid = images["netsim/neighbors"][0]
    assert (grid.height, grid.width) == (3 * (TILE + 5 + 2), 5 * (TILE + 2))
    heat = images["netsim/similarity_matrix"][0]
    assert heat.height == 10 * 4 and heat.width > heat.height
    # the neighbors in the grid / table are the ones nearest_neighbors returns (itself excluded)
    x, y = image_blobs(40, seed=1).tensors
    data = (x[:30], y[:30])
    sims, idx = nearest_neighbors(model, (x[:3], y[:3]), data, k=5)
    assert torch.equal(monitor.last_neighbors["indices"], idx[:, 1:])
    torch.testing.assert_close(monitor.last_neighbors["similarities"], sims[:, 1:], rtol=1e-5, atol=1e-6)
    table = texts["netsim/neighbors/text_summary"][0]
    assert f"| 0 | 0 | 1 | {int(idx[0, 1])} |" in table
    intra, inter = class_similarity(model, data)
    assert scalars["netsim/similarity/intra_class"][0] == pytest.approx(float(intra), rel=1e-4)
    assert scalars["netsim/similarity/inter_class"][0] == pytest.approx(float(inter), rel=1e-4, abs=1e-5)
    projector = (log_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "netsim/jacobian_sketch' in projector and "metadata_path" in projector
    metadata = next(log_dir.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0].split("\t") == ["label", "density", "index"] and len(metadata) == 31
    assert list(log_dir.rglob("sprite.png"))


def test_denoising_monitor_scalars_equal_the_core_and_candidates_are_written(tmp_path):
    monitor = DenoisingMonitor(noise_std=2.0, num_candidates=4, max_samples=24)
    model, trainer, log_dir = _validate(tmp_path, [monitor])
    images, texts, scalars = _images_and_texts(log_dir)
    x, y = image_blobs(40, seed=1).tensors
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    factor = denoising_factor(model, data)
    consistency = neighbor_consistency(model, data)
    assert scalars["netsim/denoising/mean"][0] == pytest.approx(float(factor.mean()), rel=1e-4)
    assert scalars["netsim/denoising/effective_neighbors"][0] == pytest.approx(float((1 / factor).mean()), rel=1e-4)
    assert scalars["netsim/consistency/mean"][0] == pytest.approx(float(consistency.mean()), rel=1e-4)
    assert scalars["netsim/uncertainty/mean"][0] == pytest.approx(float(predicted_noise(factor, 2.0).mean()), rel=1e-4)
    by_labels = neighbor_consistency(model, data, targets=lambda b: b[1])
    worst = int(torch.argmax(by_labels))
    assert f"| {worst} |" in texts["netsim/label_noise_candidates/text_summary"][0]
    strip = images["netsim/label_noise_candidates"][0]
    assert (strip.height, strip.width) == (4 * (TILE + 5 + 2), TILE + 2)


@pytest.mark.parametrize("make", [lambda: NeighborMonitor(max_samples=24), lambda: DenoisingMonitor(max_samples=24)])
def test_monitors_change_nothing(tmp_path, make):
    def run(callbacks, where):
        pl.seed_everything(0)
        model = ImageClassifier()
        trainer = pl.Trainer(callbacks=callbacks, logger=TensorBoardLogger(str(where)), **trainer_kwargs(where))
        trainer.fit(model, datamodule=ImageData(n_train=32, n_val=24, batch_size=8))
        return model, torch.random.get_rng_state()

    (a, rng_a), (b, rng_b) = run([], tmp_path / "a"), run([make()], tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(rng_a, rng_b)


def test_scalars_without_tensorboard_and_bad_configuration(tmp_path):
    model = ImageClassifier().eval()
    trainer = pl.Trainer(callbacks=[DenoisingMonitor(max_samples=16)], logger=CSVLogger(str(tmp_path)), **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="TensorBoardLogger"):
        trainer.validate(model, datamodule=ImageData(n_val=16, batch_size=8), verbose=False)
    assert "netsim/denoising/mean" in next(tmp_path.rglob("metrics.csv")).read_text()
    for kwargs in ({"k": 0}, {"num_queries": 0}, {"matrix_size": 1}, {"projector_dim": -1}):
        with pytest.raises(ValueError):
            NeighborMonitor(**kwargs)
    for kwargs in ({"noise_std": -1.0}, {"num_candidates": 0}, {"sketch_dim": 0}):
        with pytest.raises(ValueError):
            DenoisingMonitor(**kwargs)
