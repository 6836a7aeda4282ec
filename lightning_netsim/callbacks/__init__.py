"""Lightning callbacks that log what the network sees as similar (thin adapters over the core)."""

from lightning_netsim.callbacks._base import Kept, NetsimMonitor
from lightning_netsim.callbacks.denoising import DenoisingMonitor
from lightning_netsim.callbacks.density import DensityMonitor, density_summary
from lightning_netsim.callbacks.neighbors import NeighborMonitor

__all__ = ["DenoisingMonitor", "DensityMonitor", "Kept", "NeighborMonitor", "NetsimMonitor", "density_summary"]
