"""similarity_loss against per-pair double-backprop loops (float64), its errors, and a real training effect."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_netsim import SimilarityMixin, UsageError, pair_similarity, similarity_loss
from lightning_netsim.core.outputs import target_projection
from tests.lightning_helpers import BlobData, blobs, trainer_kwargs


def _net(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, d)).double()


def _grads(value, params):
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _isqrt(k):
    values, vectors = torch.linalg.eigh(k)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def _rho(ja, jb):
    return torch.trace(_isqrt(ja @ ja.T) @ ja @ jb.T @ _isqrt(jb @ jb.T)) / ja.shape[0]


def _reference(net, a, b, mode, project=None):
    """Loop: one ``autograd.grad(create_graph=True)`` per output row, per example (or per batch mean)."""
    params = list(net.parameters())
    project = project or (lambda out, idx: out)

    def jac(out_rows):
        return torch.stack(
            [torch.cat([g.reshape(-1) for g in _grads_graph(row, params)]) for row in out_rows]
        )

    if mode == "batch":
        return _rho(jac(project(net(a), None).mean(0)), jac(project(net(b), None).mean(0))).reshape(1)
    return torch.stack(
        [_rho(jac(project(net(a[i : i + 1]), i)[0]), jac(project(net(b[i : i + 1]), i)[0])) for i in range(len(a))]
    )


def _grads_graph(value, params):
    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _pairs(n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, 3, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("mode", ["pair", "batch"])
@pytest.mark.parametrize("direction", ["pull", "push"])
def test_value_and_gradients_equal_a_per_pair_loop(d, mode, direction):
    net, (a, b) = _net(d), _pairs()
    rho = _reference(net, a, b, mode)
    expected = (1 - rho).mean() if direction == "pull" else rho.mean()
    got = similarity_loss(net, a, b, mode=mode, direction=direction)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    params = list(net.parameters())
    for g, e in zip(_grads(got, params), _grads(expected, params)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-9)


class _Normed(nn.Module):
    """Affine layer and instance norms, whose fused kernels give wrong second derivatives under ``jacrev``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(3, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.instance_norm = nn.InstanceNorm1d(2, affine=True)
        self.out = nn.Linear(8, d)
        with torch.no_grad():  # move the affine parameters off their initial values
            for p in (*self.layer_norm.parameters(), *self.instance_norm.parameters()):
                p.add_(0.3 * torch.randn_like(p))

    def forward(self, x):
        h = torch.tanh(self.layer_norm(self.inp(x)))
        return self.out(torch.tanh(self.instance_norm(h.reshape(-1, 2, 4)).reshape(-1, 8)))


@pytest.mark.parametrize("d", [1, 3])
def test_gradients_through_norm_layers_equal_a_per_pair_loop(d):
    net, (a, b) = _Normed(d).double(), _pairs()
    expected = (1 - _reference(net, a, b, "pair")).mean()
    got = similarity_loss(net, a, b)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    params = list(net.parameters())
    for g, e in zip(_grads(got, params), _grads(expected, params)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["pair", "batch"])
def test_target_projection_output(mode):
    net, (a, b) = _net(3), _pairs(4)
    y = torch.tensor([0, 2, 1, 2])
    if mode == "pair":
        project = lambda out, i: target_projection(out, y[i : i + 1]).unsqueeze(1)  # noqa: E731
    else:
        project = lambda out, i: target_projection(out, y).unsqueeze(1)  # noqa: E731
    expected = (1 - _reference(net, a, b, mode, project)).mean()
    got = similarity_loss(net, a, b, targets=y, output="target", mode=mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    params = list(net.parameters())
    for g, e in zip(_grads(got, params), _grads(expected, params)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-9)


def test_params_restrict_the_similarity_but_gradients_reach_earlier_layers():
    net, (a, b) = _net(2), _pairs()
    loss = similarity_loss(net, a, b, params=net[4])
    assert net[0].weight in [p for p, g in zip(net.parameters(), _grads(loss, list(net.parameters()))) if g.abs().sum() > 0]
    rho = pair_similarity(net, a, b, params=["4.weight"], output="random")
    assert rho.shape == (5,) and (rho.abs() <= 1 + 1e-12).all()


def test_bad_input_is_explained():
    net, (a, b) = _net(3), _pairs()
    with pytest.raises(ValueError, match="same number of examples"):
        similarity_loss(net, a, b[:3])
    with pytest.raises(ValueError, match="Expected `targets`"):
        similarity_loss(net, a, b, output="target")
    with pytest.raises(ValueError, match="`mode`"):
        similarity_loss(net, a, b, mode="pairs")
    with pytest.raises(ValueError, match="`direction`"):
        similarity_loss(net, a, b, direction="away")
    with pytest.raises(ValueError, match="`output`"):
        similarity_loss(net, a, b, output="logits")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().train()
    with pytest.raises(UsageError, match="GroupNorm or LayerNorm"):
        similarity_loss(bn, a, b)

    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x

    with pytest.raises(UsageError, match="could not transform"):
        similarity_loss(nn.Sequential(nn.Linear(3, 2), Branchy()).double(), a, b)


def _pull_experiment(seed: int, weight: float) -> float:
    """Train on blobs with fixed same-class pairs; return their mean similarity (target output) afterwards."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = blobs(96, seed=seed).tensors
    # each example's partner: the next example of its class (cyclically)
    partner = torch.empty_like(y)
    for c in y.unique():
        members = (y == c).nonzero().squeeze(1)
        partner[members] = members.roll(-1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        a = torch.randperm(len(x), generator=gen)[:16]
        loss = nn.functional.cross_entropy(net(x[a]), y[a])
        if weight:
            loss = loss + weight * similarity_loss(net, x[a], x[partner[a]], targets=y[a], output="target")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(pair_similarity(net, x, x[partner], targets=y, output="target").detach().mean())


def test_pulling_pairs_together_increases_their_similarity():
    gains = [_pull_experiment(seed, 1.0) - _pull_experiment(seed, 0.0) for seed in range(3)]
    assert min(gains) > 0.02, gains


class _MixinNet(SimilarityMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_aug = x + 0.05 * torch.randn_like(x)
        task = nn.functional.cross_entropy(self(x), y)
        return task + 0.5 * self.similarity_loss(x, x_aug, targets=y, output="target")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_mixin_logs_and_trains_with_accumulation_clipping_and_bf16(tmp_path):
    pl.seed_everything(0)
    model = _MixinNet()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        logger=CSVLogger(str(tmp_path), name="csv"),
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    trainer.fit(model, train_dataloaders=BlobData(n_train=64, batch_size=16).train_dataloader())
    metrics = trainer.logged_metrics
    assert 0 < float(metrics["netsim/pair_similarity"]) <= 1 + 1e-6
    assert torch.isfinite(metrics["netsim/similarity_loss"])
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("case", ["random", "scaled-identity", "two-equal"])
def test_inverse_sqrt_gradient_with_repeated_eigenvalues(case):
    from lightning_netsim.core.enforcement import _inverse_sqrt

    gen = torch.Generator().manual_seed(0)
    if case == "random":
        m = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        k = m @ m.T + 0.5 * torch.eye(3, dtype=torch.float64)
    elif case == "scaled-identity":
        k = 2.0 * torch.eye(3, dtype=torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        k = q @ torch.diag(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)) @ q.T
    x = k.clone().requires_grad_()
    weights = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    fn = lambda m: (_inverse_sqrt(0.5 * (m + m.T), None) * weights).sum()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
