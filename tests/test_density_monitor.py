"""DensityMonitor in real Trainer runs: what it logs, that it equals the core, and that it changes nothing."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_netsim import DensityMonitor, UsageError, soft_density
from lightning_netsim.core.outputs import make_output_fn
from tests.lightning_helpers import BlobData, Classifier, blobs, read_events, trainer_kwargs, val_tensor


def _fit(tmp_path, callbacks, *, seed=0, logger=None, **overrides):
    pl.seed_everything(seed, workers=True)
    model = Classifier()
    logger = logger if logger is not None else TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, datamodule=BlobData())
    return trainer, model


def test_logs_once_per_validation_epoch_and_equals_the_core(tmp_path):
    trainer, model = _fit(tmp_path, [DensityMonitor(max_samples=64)], max_epochs=3)
    scalars, histograms = read_events(trainer.logger.log_dir)
    steps = [step for step, _ in scalars["netsim/density/mean"]]
    assert len(steps) == 3 and steps == sorted(steps) and steps[-1] == trainer.global_step  # no sanity-check value
    for tag in ("p10", "p50", "p90", "unique_fraction", "class_0", "class_1", "class_2"):
        assert len(scalars[f"netsim/density/{tag}"]) == 3, tag
    assert len(histograms["netsim/density"]) == 3
    expected = soft_density(model.eval(), val_tensor(limit=64), output_fn=None)
    assert scalars["netsim/density/mean"][-1][1] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert scalars["netsim/density/p50"][-1][1] == pytest.approx(float(expected.quantile(0.5)), rel=1e-5)
    last = histograms["netsim/density"][-1].histogram_value
    assert last.num == 64 and last.sum == pytest.approx(float(expected.sum()), rel=1e-4)


def _state(model, trainer):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.random.get_rng_state(),
        "metrics": {k: v.clone() for k, v in trainer.logged_metrics.items() if not k.startswith("netsim")},
    }


@pytest.mark.parametrize("output", ["full", "target", "predicted", "random"])
def test_attaching_the_callback_changes_nothing(tmp_path, output):
    plain_trainer, plain = _fit(tmp_path / "a", [])
    watched_trainer, watched = _fit(tmp_path / "b", [DensityMonitor(max_samples=48, output=output)])
    a, b = _state(plain, plain_trainer), _state(watched, watched_trainer)
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert len(a["grads"]) == len(b["grads"])
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
    assert a["modes"] == b["modes"] and torch.equal(a["rng"], b["rng"])
    assert a["metrics"].keys() == b["metrics"].keys()
    assert all(torch.equal(a["metrics"][k], b["metrics"][k]) for k in a["metrics"])


def test_validate_under_inference_mode_and_output_choices(tmp_path):
    model = Classifier().eval()
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=40, output="target")],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        **trainer_kwargs(tmp_path),
    )
    trainer.validate(model, datamodule=BlobData(), verbose=False)
    scalars, _ = read_events(trainer.logger.log_dir)
    x, y = blobs(101, seed=1).tensors
    expected = soft_density(model, (x[:40], y[:40]), output_fn=make_output_fn("target"))
    assert scalars["netsim/density/mean"][0][1] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_reference_loader_counts_reference_neighbors(tmp_path):
    reference = torch.utils.data.DataLoader(blobs(30, seed=7), batch_size=8)
    model = Classifier().eval()
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=20, reference=reference)],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        **trainer_kwargs(tmp_path),
    )
    trainer.validate(model, datamodule=BlobData(), verbose=False)
    scalars, _ = read_events(trainer.logger.log_dir)
    expected = soft_density(model, val_tensor(limit=20), reference=reference)
    assert scalars["netsim/density/mean"][0][1] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_every_n_epochs_and_resume_continue_the_schedule(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    monitor = DensityMonitor(every_n_epochs=2, max_samples=16)
    trainer, _ = _fit(tmp_path, [monitor, ckpt], max_epochs=3, enable_checkpointing=True)
    scalars, _ = read_events(trainer.logger.log_dir)
    assert len(scalars["netsim/density/mean"]) == 1  # epochs 0, 1, 2 -> after epoch 1 only
    assert monitor.state_dict() == {"runs": 1, "last_epoch": 1}

    resumed = DensityMonitor(every_n_epochs=2, max_samples=16)
    pl.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path), name="resumed")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(
        callbacks=[resumed, ckpt], logger=logger, **trainer_kwargs(tmp_path, max_epochs=4, enable_checkpointing=True)
    )
    with pytest.warns(UserWarning, match="exists and is not empty"):  # the directory of the first run
        trainer.fit(Classifier(), datamodule=BlobData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    scalars, _ = read_events(logger.log_dir)
    assert len(scalars["netsim/density/mean"]) == 1  # epoch 3 only
    assert resumed.state_dict() == {"runs": 2, "last_epoch": 3}


def test_scalars_reach_every_logger_and_a_missing_tensorboard_warns_once(tmp_path):
    csv = CSVLogger(str(tmp_path), name="csv")
    with pytest.warns(UserWarning, match="need a TensorBoardLogger") as record:
        trainer, _ = _fit(tmp_path, [DensityMonitor(max_samples=16)], logger=csv)
    assert sum("TensorBoardLogger" in str(w.message) for w in record) == 1
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "netsim/density/mean" in text and "netsim/density/class_2" in text

    tb = TensorBoardLogger(str(tmp_path), name="both")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*need a TensorBoardLogger.*")
        trainer, _ = _fit(tmp_path, [DensityMonitor(max_samples=16)], logger=[CSVLogger(str(tmp_path), name="csv2"), tb])
    _, histograms = read_events(tb.log_dir)
    assert "netsim/density" in histograms
    assert "netsim/density/mean" in (tmp_path / "csv2" / "version_0" / "metrics.csv").read_text()


def test_no_logger_is_refused_at_setup(tmp_path):
    trainer = pl.Trainer(callbacks=[DensityMonitor()], logger=False, **trainer_kwargs(tmp_path))
    with pytest.raises(UsageError, match="logger=False"):
        trainer.fit(Classifier(), datamodule=BlobData())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"max_samples": 1}, "max_samples"),
        ({"output": "logits"}, "'full', 'target', 'predicted', 'random'"),
        ({"params": "net.0"}, "list of parameter or submodule names"),
        ({"prefix": ""}, "prefix"),
        ({"unique_margin": -1}, "unique_margin"),
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DensityMonitor(**kwargs)


def test_unknown_params_name_fails_at_setup(tmp_path):
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(params=["nope"])], logger=TensorBoardLogger(str(tmp_path)), **trainer_kwargs(tmp_path)
    )
    with pytest.raises(UsageError, match="'nope'"):
        trainer.validate(Classifier(), datamodule=BlobData(), verbose=False)


def test_params_selects_a_submodule(tmp_path):
    model = Classifier().eval()
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=30, params=["net.3"])],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        **trainer_kwargs(tmp_path),
    )
    trainer.validate(model, datamodule=BlobData(), verbose=False)
    scalars, _ = read_events(trainer.logger.log_dir)
    expected = soft_density(model, val_tensor(limit=30), params=model.net[3])
    assert scalars["netsim/density/mean"][0][1] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_progress_bar_for_the_epoch_end_sweep(tmp_path, capsys):
    trainer = pl.Trainer(
        callbacks=[DensityMonitor(max_samples=40)],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        **trainer_kwargs(tmp_path, enable_progress_bar=True),
    )
    trainer.validate(Classifier(), datamodule=BlobData(), verbose=False)
    assert "netsim: density" in capsys.readouterr().err
