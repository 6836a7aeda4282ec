"""Package metadata, kept in one place for ``setup.cfg`` and ``lightning_netsim.__version__``."""

__version__ = "0.1.0.dev0"
