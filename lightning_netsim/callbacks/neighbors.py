"""NeighborMonitor: which examples the network treats as alike, as images, a heatmap and a projector entry."""

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_netsim.callbacks._base import Kept, NetsimMonitor
from lightning_netsim.callbacks._render import as_images, heatmap, markdown_table, neighbor_grid
from lightning_netsim.core.batch import flatten_batch
from lightning_netsim.core.data import check_data, iterate_batches
from lightning_netsim.core.density import DensityAccumulator
from lightning_netsim.core.distributed import replicated
from lightning_netsim.core.jacobians import grad_mode_for_autograd, per_sample_jacobian
from lightning_netsim.core.kernels import similarity
from lightning_netsim.core.neighbors import class_similarity, nearest_neighbors
from lightning_netsim.core.outputs import find_labels

__all__ = ["NeighborMonitor"]


class NeighborMonitor(NetsimMonitor):
    r"""Log what the network treats as alike: neighbors of fixed queries, a similarity heatmap, class separation.

    Each run, over up to ``max_samples`` validation examples (smallest dataset indices):

    - ``<prefix>/neighbors``: the ``k`` most similar examples of each of the first
      ``num_queries`` examples (or of the ``reference`` set): an image grid when
      inputs are images ``(C, H, W)`` with C in 1 or 3 (a row per query: the
      query, then its neighbors with a similarity bar; values and labels written
      on the tiles when Pillow is installed), and always a text table of indices,
      similarities and labels;
    - ``<prefix>/similarity_matrix``: a heatmap of :math:`\rho` over the first
      ``matrix_size`` examples, sorted by label when labels exist, with a colour scale;
    - ``<prefix>/similarity/intra_class`` and ``inter_class``: mean similarity of
      same-class and different-class pairs over all analysed examples (exact, linear time);
    - an embedding-projector entry ``<prefix>/jacobian_sketch``: a seeded random
      projection of the normalized Jacobians (``projector_dim`` directions × d
      outputs), with label, density and index metadata and image thumbnails.

    Same rules as :class:`DensityMonitor`: every rank runs every collective,
    rank 0 writes, results equal a single-process run, training is untouched.

    Args:
        every_n_epochs, max_samples, output, params, prefix: as in :class:`DensityMonitor`.
        num_queries: queries (the first analysed examples, by dataset index).
        k: neighbors per query.
        reference: ``None`` (neighbors among the analysed validation examples) or a
            re-iterable of batches to retrieve neighbors from.
        matrix_size: examples in the similarity heatmap.
        projector_dim: random directions of the Jacobian sketch (0 turns the projector off).
        seed: seed of the sketch's directions (its own generator).

    Example:
        >>> monitor = NeighborMonitor(num_queries=4, k=6)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 1024,
        num_queries: int = 8,
        k: int = 8,
        reference: Optional[Iterable[Any]] = None,
        matrix_size: int = 64,
        projector_dim: int = 16,
        output: Union[str, Callable[..., Tensor]] = "full",
        params: Optional[list[str]] = None,
        prefix: str = "netsim",
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, max_samples=max_samples, output=output, params=params, prefix=prefix
        )
        for name, value, low in (("num_queries", num_queries, 1), ("k", k, 1), ("matrix_size", matrix_size, 2), ("projector_dim", projector_dim, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Expected `{name}` to be an integer >= {low}, but got {value!r}.")
        if reference is not None:
            check_data(reference, "reference")
        self.num_queries, self.k, self.reference = num_queries, k, reference
        self.matrix_size, self.projector_dim, self.seed = matrix_size, projector_dim, seed
        self._acc: Optional[DensityAccumulator] = None
        self._kept: list[tuple[Kept, Tensor]] = []
        self.last_neighbors: Optional[dict[str, Any]] = None  # the latest retrieval, for inspection

    def start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._acc = DensityAccumulator(pl_module, **self.core_options(pl_module))
        self._kept = []

    def on_kept(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kept: Kept) -> None:
        assert self._acc is not None
        self._kept.append((kept, self._acc.add(kept.batch, name="validation batch")))

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        acc, kept_w, self._acc, self._kept = self._acc, self._kept, None, []
        assert acc is not None and self._chosen is not None
        device = trainer.strategy.root_device
        kept = [item for item, _ in kept_w]
        options = self.core_options(pl_module)
        total = len(self._chosen)
        batches = [item.batch for item in kept]
        local_pos = torch.cat([self.compact(item.indices) for item in kept]) if kept else torch.zeros(0, dtype=torch.long, device=device)
        has_labels = self.all_ranks(all(item.labels is not None for item in kept), device)
        writers = self.tensorboards(trainer, "images, histograms and the projector")
        step = trainer.global_step

        # neighbors of the queries
        num_q = min(self.num_queries, total)
        queries = self.fetch(kept, torch.arange(num_q, device=device))
        if self.reference is None:
            sims, idx = nearest_neighbors(
                pl_module, [queries], batches, k=min(self.k + 1, total), shard=local_pos,
                query_shard=torch.arange(num_q, device=device), **options,
            )
            sims, idx = _drop_self(sims, idx, self.k)
            neighbor_batch = self.fetch(kept, idx.flatten().to(device))
            neighbor_ids = self._chosen[idx.to(self._chosen.device)]
        else:
            with replicated():
                count = sum(flatten_batch(b)[0][0].shape[0] for b in iterate_batches(self.reference, "reference"))
                sims, idx = nearest_neighbors(pl_module, [queries], self.reference, k=min(self.k, count), **options)
            neighbor_batch = _rows_of(self.reference, idx.flatten())
            neighbor_ids = idx
        query_ids = self._chosen[:num_q]
        query_labels = find_labels(queries)
        neighbor_labels = find_labels(neighbor_batch)
        if neighbor_labels is not None:
            neighbor_labels = neighbor_labels.reshape(idx.shape)
        self.last_neighbors = {
            "query_indices": query_ids.cpu(), "indices": neighbor_ids.cpu(), "similarities": sims.detach().cpu(),
        }
        rows = []
        for r in range(num_q):
            label = "" if query_labels is None else int(query_labels[r])
            for c in range(idx.shape[1]):
                other = "" if neighbor_labels is None else int(neighbor_labels[r, c])
                rows.append([int(query_ids[r]), label, c + 1, int(neighbor_ids[r, c]), f"{float(sims[r, c]):.4f}", other])
        table = markdown_table(["query", "query label", "rank", "neighbor", "similarity", "neighbor label"], rows)
        images = as_images(queries)
        for writer in writers:
            writer.add_text(f"{self.prefix}/neighbors", table, step)
            if images is not None:
                neighbor_images = as_images(neighbor_batch)
                assert neighbor_images is not None
                grid = neighbor_grid(
                    images, neighbor_images.reshape(num_q, idx.shape[1], *images.shape[1:]), sims, query_labels, neighbor_labels
                )
                writer.add_image(f"{self.prefix}/neighbors", grid, step)

        # similarity heatmap over a subset, sorted by label
        size = min(self.matrix_size, total)
        subset = self.fetch(kept, torch.arange(size, device=device))
        with replicated():
            rho = similarity(per_sample_jacobian(pl_module, subset, **options))
        labels = find_labels(subset)
        if labels is not None:
            order = torch.argsort(labels.cpu(), stable=True)
            rho = rho[order][:, order]
        for writer in writers:
            writer.add_image(f"{self.prefix}/similarity_matrix", heatmap(rho.detach().cpu()), step)

        # class separation, exactly over all analysed examples
        scalars: dict[str, float] = {}
        if has_labels:
            intra, inter = class_similarity(pl_module, batches, shard=local_pos, **options)
            scalars[f"{self.prefix}/similarity/intra_class"] = float(intra)
            scalars[f"{self.prefix}/similarity/inter_class"] = float(inter)

        # projector: sketch of the normalized Jacobians, with density metadata
        acc.reduce()
        density = torch.cat([acc.count(item.batch, w) for item, w in kept_w]) if kept_w else torch.zeros(0, dtype=acc.engine.dtype, device=device)
        sketch = self._sketch(acc, kept_w, device)
        if has_labels:
            local_labels = torch.cat([item.labels.to(device) for item in kept] + [local_pos.new_zeros(0)]).long()  # type: ignore[union-attr]
        else:
            local_labels = torch.zeros_like(local_pos)
        all_pos, density, sketch, all_labels = self.gather_ordered(local_pos.to(device), density.to(device), sketch, local_labels)
        if self.projector_dim > 0:
            thumbs = None
            if images is not None:
                thumbs = torch.nn.functional.interpolate(_normalize(as_images(self.fetch(kept, all_pos.to(device)))), size=(32, 32))
            meta = [
                [int(all_labels[i]) if has_labels else "", f"{float(density[i]):.3f}", int(self._chosen[int(all_pos[i])])]
                for i in range(len(all_pos))
            ]
            for writer in writers:
                writer.add_embedding(
                    sketch.detach().cpu(), metadata=meta, metadata_header=["label", "density", "index"],
                    label_img=None if thumbs is None else thumbs.cpu(), global_step=step, tag=f"{self.prefix}/jacobian_sketch",
                )
        if scalars:
            self.log_scalars(trainer, scalars)
        self.flush(trainer)

    def _sketch(self, acc: DensityAccumulator, kept_w: list[tuple[Kept, Tensor]], device: torch.device) -> Tensor:
        """``(n, s·d)``: ``Ĵ_i`` projected on ``s`` seeded Gaussian directions (inner products kept on average)."""
        engine = acc.engine
        s = max(self.projector_dim, 1)
        gen = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(s, engine.num_params, generator=gen, dtype=torch.float64).to(engine.device, engine.dtype)
        parts = []
        for item, w in kept_w:
            with grad_mode_for_autograd():
                tangent = engine.jvp(engine.prepare(item.batch), directions)  # (s, B, d)
            parts.append(torch.einsum("bmk,sbk->bsm", w, tangent).flatten(1) / s**0.5)
        d = kept_w[0][1].shape[1] if kept_w else 1
        return torch.cat(parts).to(device) if parts else torch.zeros(0, s * d, dtype=engine.dtype, device=device)


def _drop_self(sims: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Remove each query's own entry (query ``q`` is example ``q``) and keep ``k`` neighbors."""
    own = idx == torch.arange(idx.shape[0], device=idx.device)[:, None]
    keep_s, keep_i = [], []
    for r in range(idx.shape[0]):
        rows = (~own[r]).nonzero().squeeze(1)[:k]
        keep_s.append(sims[r, rows])
        keep_i.append(idx[r, rows])
    width = min(len(t) for t in keep_i)
    return torch.stack([t[:width] for t in keep_s]), torch.stack([t[:width] for t in keep_i])


def _rows_of(data: Any, wanted: Tensor) -> Any:
    """Examples at positions ``wanted`` (iteration order) of a re-iterable of batches."""
    found: dict[int, tuple[int, int]] = {}
    batches = list(iterate_batches(data, "reference"))
    start = 0
    for b, batch in enumerate(batches):
        n = flatten_batch(batch)[0][0].shape[0]
        for j in range(n):
            found[start + j] = (b, j)
        start += n
    leaves0, rebuild = flatten_batch(batches[0])
    picked = [[flatten_batch(batches[found[int(w)][0]])[0][i][found[int(w)][1]] for w in wanted] for i in range(len(leaves0))]
    return rebuild([torch.stack(column) for column in picked])


def _normalize(images: Optional[Tensor]) -> Tensor:
    assert images is not None
    x = images.detach().float()
    low = x.flatten(1).amin(1)[:, None, None, None]
    high = x.flatten(1).amax(1)[:, None, None, None]
    return (x - low) / (high - low).clamp_min(1e-12)
