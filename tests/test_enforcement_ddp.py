"""Under DDP (2 gloo processes) the mixin's gradients equal the average of single-process shard gradients."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_netsim import SimilarityMixin
from tests.ddp import run_two_ranks
from tests.lightning_helpers import blobs, trainer_kwargs


class PairNet(SimilarityMixin, pl.LightningModule):
    """``only_similarity``: the loss is the similarity term alone (some parameters then get no real gradient)."""

    def __init__(self, only_similarity: bool = False, out: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.unused_head = nn.Linear(8, 2)  # never in any loss
        self.only_similarity, self.out = only_similarity, out

    def forward(self, x):
        return self.net(x)

    def step_loss(self, x, y):
        sim = self.similarity_loss(x, x.flip(0), targets=y, output="target", log=False)
        return sim if self.only_similarity else nn.functional.cross_entropy(self(x), y) + 0.5 * sim

    def training_step(self, batch, batch_idx):
        return self.step_loss(*batch)

    def on_before_optimizer_step(self, optimizer):
        if self.out and self.global_step == 0:
            grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in self.named_parameters()}
            torch.save(grads, f"{self.out}.{self.global_rank}")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Shard(torch.utils.data.Sampler):
    """Rank r takes examples r, r+2, ... (read from torch.distributed when iterated, in the worker)."""

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank, 32, 2))

    def __len__(self):
        return 16


def _loader():
    return DataLoader(blobs(32, seed=3), batch_size=8, sampler=_Shard())


def _reference(only_similarity: bool) -> dict:
    """Average over the two DistributedSampler shards (ranks take indices r, r+2, ...) of one-process gradients."""
    x, y = blobs(32, seed=3).tensors
    total: dict = {}
    for rank in range(2):
        model = PairNet(only_similarity)
        idx = torch.arange(rank, 32, 2)[:8]
        loss = model.step_loss(x[idx], y[idx])
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for (name, p), g in zip(model.named_parameters(), grads):
            g = torch.zeros_like(p) if g is None else g
            total[name] = total.get(name, 0) + g / 2
    return total


def _fit_one_step(tmp_path, only_similarity: bool, out: str) -> None:
    trainer = pl.Trainer(
        logger=False,
        max_steps=1,
        strategy="ddp",
        use_distributed_sampler=False,
        **trainer_kwargs(tmp_path, devices=2, max_epochs=1),
    )
    trainer.fit(PairNet(only_similarity, out), train_dataloaders=_loader())


@pytest.mark.slow
@pytest.mark.parametrize("only_similarity", [False, True], ids=["task+similarity", "similarity-only"])
def test_ddp_gradients_equal_the_average_of_shard_gradients(tmp_path, only_similarity):
    out = str(tmp_path / "grads")
    run_two_ranks(_fit_one_step, tmp_path, only_similarity, out)
    expected = _reference(only_similarity)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} on rank {rank}: {m}")
