r"""Similarity enforcement: a differentiable loss that makes pairs of examples similar for the network.

For pairs :math:`(A_i, B_i)` known to be alike, ``direction="pull"`` gives
:math:`\operatorname{mean}_i (1 - \rho(A_i, B_i))`; ``"push"`` gives
:math:`\operatorname{mean}_i \rho(A_i, B_i)` for pairs known to differ (the sign
of the official code as written). Gradients with respect to the parameters
go through the per-example Jacobians (double backpropagation) and through the
``d × d`` normalizers.
"""

from typing import Any, Callable, Literal, Optional, Union, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lightning_netsim.core.batch import batch_size, flatten_batch
from lightning_netsim.core.jacobians import _parameter_aliases, _transform_error, math_attention, plain_norms
from lightning_netsim.core.outputs import RandomProjection, target_projection
from lightning_netsim.core.parameters import ParamSelection, select_parameters
from lightning_netsim.errors import UsageError

__all__ = ["pair_similarity", "similarity_loss"]

Mode = Literal["pair", "batch"]
Direction = Literal["pull", "push"]
_OUTPUTS = ("full", "target", "predicted", "random")


def _check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            raise UsageError(
                f"BatchNorm module {name or type(model).__name__!r} normalizes with batch statistics, so "
                "per-example gradients (and their similarity) are ill-defined: each example's output depends "
                "on the whole batch. Fix: use GroupNorm or LayerNorm, or put the BatchNorm layers in eval mode "
                "(running statistics) while computing the similarity loss."
            )


def _outputs(output: Union[str, Callable[..., Tensor]], output_fn: Optional[Callable[..., Tensor]], seed: int):
    """``(model, x, y) -> [B, d]``: raw outputs, then the chosen projection."""
    if callable(output):

        def custom(model: nn.Module, x: Any, y: Optional[Tensor]) -> Tensor:
            out = output(model, x)
            return out.reshape(out.shape[0], -1)

        return custom
    if output not in _OUTPUTS:
        raise ValueError(f"Expected `output` to be one of {_OUTPUTS} or a callable, but got {output!r}.")
    raw_fn = output_fn or (lambda model, x: model(x))
    projection = RandomProjection(seed)

    def fn(model: nn.Module, x: Any, y: Optional[Tensor]) -> Tensor:
        raw = raw_fn(model, x)
        raw = raw.reshape(raw.shape[0], -1)
        if output == "full":
            return raw
        if output == "target":
            assert y is not None
            return target_projection(raw, y).unsqueeze(1)
        if output == "predicted":
            return target_projection(raw, raw.detach().argmax(1)).unsqueeze(1)
        return projection(nn.Identity(), raw).unsqueeze(1)

    return fn


class _InverseSqrtPSD(torch.autograd.Function):
    """Pseudo-inverse square root of symmetric PSD blocks, with a backward that tolerates equal eigenvalues.

    The backward is the Daleckii-Krein formula: in the eigenbasis the derivative
    is ``L ∘ (Vᵀ dK V)`` with ``L_ij`` the divided difference of
    ``f(λ) = λ^{-1/2}`` (its derivative where ``λ_i ≈ λ_j``), so repeated
    eigenvalues (e.g. ``K ∝ I``) give finite gradients, unlike ``eigh``'s own backward.
    """

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, cut: float) -> Tensor:  # type: ignore[override]
        values, vectors = torch.linalg.eigh(kernel)
        tiny = torch.finfo(kernel.dtype).tiny
        kept = values > cut * values.amax(-1, keepdim=True).clamp_min(tiny)
        safe = values.clamp_min(tiny)
        f = torch.where(kept, safe.rsqrt(), torch.zeros_like(values))
        df = torch.where(kept, -0.5 * safe.rsqrt() / safe, torch.zeros_like(values))
        ctx.save_for_backward(values, vectors, f, df)
        return (vectors * f[..., None, :]) @ vectors.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        values, vectors, f, df = ctx.saved_tensors
        gap = values[..., :, None] - values[..., None, :]
        scale = torch.maximum(values[..., :, None].abs(), values[..., None, :].abs())
        close = gap.abs() <= torch.finfo(values.dtype).eps ** 0.5 * scale
        divided = (f[..., :, None] - f[..., None, :]) / torch.where(close, torch.ones_like(gap), gap)
        mid = 0.5 * (df[..., :, None] + df[..., None, :])
        weights = torch.where(close, mid, divided)
        inner = vectors.mT @ (0.5 * (grad + grad.mT)) @ vectors
        return vectors @ (weights * inner) @ vectors.mT, None


def _inverse_sqrt(kernel: Tensor, eps: Optional[float]) -> Tensor:
    """Differentiable pseudo-inverse square root of PSD ``(..., d, d)`` blocks."""
    d = kernel.shape[-1]
    cut = eps if eps is not None else 100 * d * torch.finfo(kernel.dtype).eps
    if d == 1:
        k = kernel[..., 0, 0]
        tiny = torch.finfo(kernel.dtype).tiny
        return torch.where(k > tiny, k.clamp_min(tiny).rsqrt(), torch.zeros_like(k))[..., None, None]
    return _InverseSqrtPSD.apply(kernel, cut)


def _rho(ja: Tensor, jb: Tensor, eps: Optional[float]) -> Tensor:
    """``(B,)`` normalized similarity of Jacobian pairs ``(B, d, P)``."""
    d = ja.shape[1]
    wa, wb = _inverse_sqrt(ja @ ja.mT, eps), _inverse_sqrt(jb @ jb.mT, eps)
    cross = ja @ jb.mT
    return torch.einsum("bij,bjk,bki->b", wa, cross, wb) / d


def pair_similarity(
    model: nn.Module,
    inputs_a: Any,
    inputs_b: Any,
    *,
    output_fn: Optional[Callable[..., Tensor]] = None,
    targets: Optional[Tensor] = None,
    output: Union[str, Callable[..., Tensor]] = "full",
    mode: Mode = "pair",
    params: ParamSelection = None,
    eps: Optional[float] = None,
    seed: int = 0,
) -> Tensor:
    r"""Differentiable :math:`\rho(A_i, B_i)` for each pair (``mode="pair"``, ``(B,)``) or of the batches (``(1,)``).

    Arguments as in :func:`similarity_loss`.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(4, 3)
        >>> pair_similarity(net, x, x).detach()
        tensor([1.0000, 1.0000, 1.0000, 1.0000])
    """
    if mode not in get_args(Mode):
        raise ValueError(f"Expected `mode` to be one of {get_args(Mode)}, but got {mode!r}.")
    if output == "target" and targets is None:
        raise ValueError(
            "Expected `targets` (integer class labels, shape [B]) with `output=\"target\"`: the projection "
            "z_y - mean_{c != y} z_c needs the class y of each pair. Fix: pass `targets=y`."
        )
    n_a = batch_size(flatten_batch(inputs_a)[0], name="inputs_a")
    n_b = batch_size(flatten_batch(inputs_b)[0], name="inputs_b")
    if n_a != n_b:
        raise ValueError(
            f"Expected `inputs_a` and `inputs_b` to hold the same number of examples (pairs), but got {n_a} "
            f"and {n_b}. Fix: pair the examples one to one."
        )
    if targets is not None and (targets.ndim != 1 or targets.shape[0] != n_a):
        raise ValueError(f"Expected `targets` of shape ({n_a},), but got {tuple(targets.shape)}.")
    _check_model(model)
    selected = select_parameters(model, params)
    fn = _outputs(output, output_fn, seed)
    autocast_off = torch.autocast(device_type=next(iter(selected.values())).device.type, enabled=False)
    with torch.enable_grad(), autocast_off, math_attention(), plain_norms():
        if mode == "batch":
            return _batch_similarity(model, selected, fn, inputs_a, inputs_b, targets, eps)
        return _pair_similarity(model, selected, fn, inputs_a, inputs_b, targets, eps)


def _float32(batch: Any) -> Any:
    leaves, rebuild = flatten_batch(batch)
    return rebuild([t.float() if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16) else t for t in leaves])


def _batch_similarity(model, selected, fn, inputs_a, inputs_b, targets, eps) -> Tensor:
    params = list(selected.values())

    def batch_jacobian(inputs: Any) -> Tensor:
        mean = fn(model, _float32(inputs), targets).mean(0)  # (d,)
        rows = []
        for k in range(mean.shape[0]):
            grads = torch.autograd.grad(mean[k], params, create_graph=True, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
        return torch.stack(rows)

    return _rho(batch_jacobian(inputs_a)[None], batch_jacobian(inputs_b)[None], eps)


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Any, y: Optional[Tensor]) -> Tensor:
        return self.fn(self.model, x, y)


def _pair_similarity(model, selected, fn, inputs_a, inputs_b, targets, eps) -> Tensor:
    wrapper = _Wrapper(model, fn)
    aliases = _parameter_aliases(model)
    names = {name: [f"model.{a}" for a in aliases[id(p)]] for name, p in selected.items()}

    def one(theta: dict[str, Tensor], leaves: list[Tensor], rebuild: Any, y: Optional[Tensor]) -> Tensor:
        swapped = {alias: theta[name] for name, group in names.items() for alias in group}
        x = rebuild([t.unsqueeze(0) for t in leaves])
        out = functional_call(wrapper, swapped, (x, None if y is None else y.unsqueeze(0)), tie_weights=False)
        return out[0]

    theta = dict(selected)

    def jacobians(inputs: Any) -> Tensor:
        leaves, rebuild = flatten_batch(_float32(inputs))
        per_sample = lambda th, lv, y: one(th, lv, rebuild, y)  # noqa: E731
        in_dims = (None, 0, None if targets is None else 0)
        try:
            jac = vmap(jacrev(per_sample), in_dims=in_dims, randomness="different")(theta, leaves, targets)
        except RuntimeError as err:
            raise _transform_error(model, err) from err
        n = leaves[0].shape[0]
        return torch.cat([jac[name].reshape(n, -1, p.numel()) for name, p in selected.items()], dim=2)

    return _rho(jacobians(inputs_a), jacobians(inputs_b), eps)


def similarity_loss(
    model: nn.Module,
    inputs_a: Any,
    inputs_b: Any,
    *,
    output_fn: Optional[Callable[..., Tensor]] = None,
    targets: Optional[Tensor] = None,
    output: Union[str, Callable[..., Tensor]] = "full",
    mode: Mode = "pair",
    direction: Direction = "pull",
    params: ParamSelection = None,
    eps: Optional[float] = None,
    seed: int = 0,
) -> Tensor:
    r"""A loss that makes pairs similar (``"pull"``) or dissimilar (``"push"``) from the network's perspective.

    ``pull``: :math:`\operatorname{mean}_i (1 - \rho(A_i, B_i))`; ``push``:
    :math:`\operatorname{mean}_i \rho(A_i, B_i)`. Differentiable with respect to
    every parameter (double backpropagation); computed in float32 under autocast.

    Args:
        model: the network (BatchNorm must use running statistics; dropout in
            training mode draws an independent mask per example).
        inputs_a, inputs_b: paired inputs (tensors or nested batches) of ``B`` examples each.
        output_fn: ``(model, inputs) -> [B, C]`` raw outputs; default ``model(inputs)``.
        targets: ``(B,)`` class labels, required by ``output="target"``.
        output: ``"full"`` (all outputs, d = C), ``"target"`` (:math:`z_y - \operatorname{mean}_{c \ne y} z_c`),
            ``"predicted"`` (the same with the predicted class), ``"random"`` (a
            fixed projection drawn from ``seed`` with its own generator), or a
            callable ``(model, inputs) -> [B, d]``.
        mode: ``"pair"``: per-example Jacobians of each pair (vectorized);
            ``"batch"``: one Jacobian per side of the batch-averaged output (the official code).
        direction: ``"pull"`` or ``"push"``.
        params: which parameters the similarity is taken over (gradients reach all of them).
        eps: pseudo-inverse cut-off of the normalizers.
        seed: seed of the ``"random"`` projection.

    Returns:
        A scalar loss tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(4, 3)
        >>> loss = similarity_loss(net, x, x + 0.1 * torch.randn(4, 3))
        >>> loss.backward()
        >>> net[0].weight.grad.shape
        torch.Size([8, 3])
    """
    if direction not in get_args(Direction):
        raise ValueError(f"Expected `direction` to be one of {get_args(Direction)}, but got {direction!r}.")
    rho = pair_similarity(
        model, inputs_a, inputs_b, output_fn=output_fn, targets=targets, output=output, mode=mode,
        params=params, eps=eps, seed=seed,
    )
    return (1 - rho).mean() if direction == "pull" else rho.mean()
