"""Lightning callbacks that log what the network sees as similar (thin adapters over the core)."""

from lightning_netsim.callbacks._base import Kept, NetsimMonitor
from lightning_netsim.callbacks.density import DensityMonitor, density_summary

__all__ = ["DensityMonitor", "Kept", "NetsimMonitor", "density_summary"]
