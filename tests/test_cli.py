"""DensityMonitor configured from a LightningCLI YAML file."""

import sys
import textwrap

from pytorch_lightning.cli import LightningCLI

from lightning_netsim import DensityMonitor
from tests.lightning_helpers import BlobData, Classifier, read_events


def test_density_monitor_from_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            trainer:
              default_root_dir: {tmp_path}
              max_epochs: 1
              log_every_n_steps: 1
              accelerator: cpu
              devices: 1
              enable_progress_bar: false
              enable_model_summary: false
              enable_checkpointing: false
              logger:
                class_path: pytorch_lightning.loggers.TensorBoardLogger
                init_args:
                  save_dir: {tmp_path}
                  name: cli
              callbacks:
                - class_path: lightning_netsim.DensityMonitor
                  init_args:
                    every_n_epochs: 1
                    max_samples: 40
                    output: target
                    params: [net.3]
                    prefix: sim
            """
        )
    )
    cli = LightningCLI(Classifier, BlobData, args=["fit", "--config", str(config)], save_config_callback=None)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DensityMonitor))
    assert (monitor.max_samples, monitor.output, monitor.params, monitor.prefix) == (40, "target", ["net.3"], "sim")
    scalars, _ = read_events(tmp_path / "cli")
    assert len(scalars["sim/density/mean"]) == 1
