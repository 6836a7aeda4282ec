"""Exact per-sample Jacobians of a network's outputs with respect to its parameters."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode

from lightning_netsim.core.batch import Batch, Rebuild, batch_size, flatten_batch, prepare_leaves
from lightning_netsim.core.parameters import ParamSelection, check_per_sample_model, select_parameters
from lightning_netsim.errors import UsageError

__all__ = [
    "JacobianEngine",
    "OutputFn",
    "PreparedBatch",
    "default_output_fn",
    "functional_forward",
    "grad_mode_for_autograd",
    "per_sample_jacobian",
]

OutputFn = Callable[[nn.Module, Batch], Tensor]
"""``output_fn(model, batch) -> Tensor[B, d]`` (or ``[B]``, meaning d = 1)."""


def default_output_fn(model: nn.Module, batch: Batch) -> Tensor:
    """``model(batch[0])`` for a tuple or list batch, ``model(batch)`` otherwise.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> default_output_fn(net, (torch.zeros(5, 3), torch.zeros(5))).shape
        torch.Size([5, 2])
    """
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class _OutputModule(nn.Module):
    """Wraps ``output_fn`` so that ``functional_call`` swaps parameters for all of it."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.output_fn(self.model, batch)


@contextmanager
def grad_mode_for_autograd() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextmanager
def math_attention() -> Iterator[None]:
    """Use the plain-math attention kernel: fused ones lack vmap batching rules and double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _plain_layer_norm(
    input: Tensor, normalized_shape: Any, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    centered = input - input.mean(dims, keepdim=True)
    out = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _plain_instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (input.ndim - 2)
    if use_input_stats:
        centered = input - input.mean(tuple(range(2, input.ndim)), keepdim=True)
        out = centered * torch.rsqrt(centered.square().mean(tuple(range(2, input.ndim)), keepdim=True) + eps)
    else:
        assert running_mean is not None and running_var is not None
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


class _PlainNorms(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _plain_layer_norm(*args, **kwargs)
        if func is F.instance_norm:
            bound = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats"), args))
            bound.update(kwargs)
            updates_stats = bound.get("use_input_stats", True) and bound.get("running_mean") is not None
            if not updates_stats:  # running-statistics updates stay with torch's kernel
                return _plain_instance_norm(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def plain_norms() -> Iterator[None]:
    """Compute ``F.layer_norm`` and ``F.instance_norm`` from elementary ops inside this scope.

    ``torch.func.jacrev`` of the fused layer and instance norms gives wrong second
    derivatives with respect to their affine parameters (torch 2.13: a double
    backward through ``vmap(jacrev(...))`` differs from a per-example
    ``autograd.grad`` loop and from finite differences by about 1e-3); the
    elementary ops are exact. Double backpropagation runs inside this scope.
    """
    with _PlainNorms():
        yield


def _output_rows(out: object, *, per_sample: bool) -> Tensor:
    """Check an ``output_fn`` result and reshape it to ``[B, d]``."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Expected `output_fn` to return a tensor of shape [B] or [B, d], but it returned a "
            f"{type(out).__name__}. Fix: pass `output_fn=lambda model, batch: ...` that selects "
            "the output tensor (e.g. `model(batch[0])['logits']`)."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"Expected `output_fn` to return a floating-point tensor, but got dtype {out.dtype}."
        )
    if out.ndim not in (1, 2) or (per_sample and out.shape[0] != 1):
        where = "for a batch of one example it returned" if per_sample else "it returned"
        raise ValueError(
            f"Expected `output_fn` to return a tensor of shape [B] or [B, d], but {where} shape "
            f"{tuple(out.shape)}. Fix: flatten the outputs per example, e.g. "
            "`output_fn=lambda model, batch: model(batch[0]).flatten(1)`."
        )
    return out.reshape(out.shape[0], -1)


def _parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter is used, one per (module, attribute) pair.

    A module reused in several places appears once (``named_modules`` removes
    duplicates), while a parameter tied between two modules gets both names.
    """
    aliases: dict[int, list[str]] = {}
    for prefix, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            aliases.setdefault(id(p), []).append(f"{prefix}.{attr}" if prefix else attr)
    return aliases


def functional_forward(
    model: nn.Module, selected: dict[str, nn.Parameter], output_fn: OutputFn
) -> Callable[..., Tensor]:
    """``call(theta, batch, per_sample=False) -> Tensor[B, d]`` with the selected parameters replaced.

    ``theta`` maps the names of ``selected`` to tensors; the other parameters
    enter detached, so no autograd graph reaches the model. The swap covers all of
    ``output_fn`` (it may call any method or submodule of ``model``) and every
    alias of a tied parameter; the model is restored afterwards. Weights are
    never tied by ``functional_call`` itself: its tying mishandles a module
    reused under two names and leaves plain tensors in place of parameters.
    """
    wrapper = _OutputModule(model, output_fn)
    aliases = _parameter_aliases(model)
    names = {name: [f"model.{alias}" for alias in aliases[id(p)]] for name, p in selected.items()}
    others = {
        f"model.{alias}": p
        for name, p in model.named_parameters()
        if name not in selected
        for alias in aliases[id(p)]
    }

    def call(theta: dict[str, Tensor], batch: Batch, per_sample: bool = False) -> Tensor:
        swapped = {alias: p.detach() for alias, p in others.items()}
        swapped.update((alias, theta[name]) for name, group in names.items() for alias in group)
        out = functional_call(wrapper, swapped, (batch,), tie_weights=False)
        return _output_rows(out, per_sample=per_sample)

    return call


class PreparedBatch(NamedTuple):
    """A batch copied onto the model's device as autograd-usable leaves."""

    leaves: list[Tensor]
    rebuild: Rebuild
    size: int


class JacobianEngine:
    """The model as a function of the selected parameters, with per-batch derivative primitives.

    Validates the model once (trainable parameters, no batch statistics, no
    training-mode dropout); every method runs with autograd enabled, on copies
    of the batch, and returns detached tensors. Flat parameter vectors follow
    the column order of :func:`per_sample_jacobian`.

    Args:
        model: the network.
        output_fn: see :func:`per_sample_jacobian`.
        params: see :func:`~lightning_netsim.core.parameters.select_parameters`.
        chunk_size: examples per ``vmap`` chunk; default the whole batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        output_fn: Optional[OutputFn] = None,
        params: ParamSelection = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"Expected `chunk_size` to be a positive integer or None, but got {chunk_size!r}.")
        self.model = model
        self.selected = select_parameters(model, params)
        check_per_sample_model(model)
        self.chunk_size = chunk_size
        self.output_fn = output_fn or default_output_fn
        self._call = functional_forward(model, self.selected, self.output_fn)
        first = next(iter(self.selected.values()))
        self.device, self.dtype = first.device, first.dtype
        self.num_params = sum(p.numel() for p in self.selected.values())
        self._forward_ad = True

    def theta(self) -> dict[str, Tensor]:
        """The selected parameters, detached."""
        return {name: p.detach() for name, p in self.selected.items()}

    def prepare(self, batch: Batch, name: str = "inputs") -> PreparedBatch:
        """Flatten, check and copy a batch. Call under :func:`grad_mode_for_autograd`."""
        leaves, rebuild = flatten_batch(batch)
        n = batch_size(leaves, name=name)
        return PreparedBatch(prepare_leaves(leaves, self.device), rebuild, n)

    def _guard(self, fn: Callable[[], Tensor]) -> Tensor:
        try:
            with grad_mode_for_autograd(), math_attention():
                return fn()
        except RuntimeError as err:
            raise _transform_error(self.model, err) from err

    def outputs(self, batch: PreparedBatch) -> Tensor:
        """Outputs ``(B, d)`` (detached)."""
        with torch.no_grad():
            return _output_rows(self._call(self.theta(), batch.rebuild(batch.leaves)), per_sample=False)

    def jacobian(self, batch: PreparedBatch) -> Tensor:
        """Per-sample Jacobians ``(B, d, P)``."""
        rebuild = batch.rebuild

        def one_sample(theta: dict[str, Tensor], sample: Sequence[Tensor]) -> Tensor:
            return self._call(theta, rebuild([t.unsqueeze(0) for t in sample]), per_sample=True)[0]

        def run() -> Tensor:
            fn = vmap(jacrev(one_sample), in_dims=(None, 0), chunk_size=self.chunk_size)
            jac = fn(self.theta(), batch.leaves)
            blocks = [jac[name].reshape(batch.size, -1, p.numel()) for name, p in self.selected.items()]
            return torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]

        return self._guard(run)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``(..., P)`` into ``{name: (..., *shape)}``."""
        lead = flat.shape[:-1]
        parts = flat.split([p.numel() for p in self.selected.values()], dim=-1)
        return {name: part.reshape(*lead, *p.shape) for (name, p), part in zip(self.selected.items(), parts)}

    def jvp(self, batch: PreparedBatch, tangents: Tensor) -> Tensor:
        """Directional derivatives ``J_i t_r`` of the outputs: ``(R, B, d)`` for tangents ``(R, P)``.

        One forward-mode pass per tangent, vectorized over the R tangents. Models
        with an operation that forward-mode AD does not support (e.g. the fused
        inference kernel of ``nn.TransformerEncoderLayer``) get the same numbers
        from two reverse-mode passes instead.
        """
        if not self._forward_ad:
            return self._jvp_by_double_backward(batch, tangents)
        theta = self.theta()
        inputs = batch.rebuild(batch.leaves)

        def directional(tangent: dict[str, Tensor]) -> Tensor:
            return jvp(lambda th: self._call(th, inputs), (theta,), (tangent,))[1]

        split = self.unflatten(tangents.to(self.dtype))
        try:
            if tangents.shape[0] == 1:  # one tangent: skip vmap's overhead
                return self._guard(lambda: directional({k: v[0] for k, v in split.items()}).unsqueeze(0))
            return self._guard(lambda: vmap(directional)(split))
        except NotImplementedError as err:
            if "forward AD" not in str(err):
                raise
            self._forward_ad = False
            return self._jvp_by_double_backward(batch, tangents)

    def _jvp_by_double_backward(self, batch: PreparedBatch, tangents: Tensor) -> Tensor:
        """``J t`` as the derivative of the linear map ``v ↦ Jᵀ v`` along ``t`` (reverse over reverse)."""

        def run() -> Tensor:
            theta = {name: t.requires_grad_() for name, t in self.theta().items()}
            out = self._call(theta, batch.rebuild(batch.leaves))
            probe = torch.zeros_like(out, requires_grad=True)
            params = list(theta.values())
            vjp = torch.autograd.grad(out, params, probe, create_graph=True, allow_unused=True)
            pairs = [(g, p) for g, p in zip(vjp, params) if g is not None]
            rows = []
            for r in range(tangents.shape[0]):
                split = self.unflatten(tangents[r].to(self.dtype))
                names = [n for n, p in theta.items() if any(p is q for _, q in pairs)]
                grads = [g for g, _ in pairs]
                rows.append(torch.autograd.grad(grads, probe, [split[n] for n in names], retain_graph=True)[0])
            return torch.stack(rows).detach()

        return self._guard(run)


def per_sample_jacobian(
    model: nn.Module,
    inputs: Batch,
    *,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Exact per-sample Jacobians :math:`J_i = \partial f_\theta(x_i) / \partial \theta`.

    Vectorized with ``torch.func`` (``functional_call`` + ``vmap(jacrev)``):
    each example is run as a batch of one, so nothing couples the examples.
    Works under ``torch.no_grad()`` and ``torch.inference_mode()``; never
    writes ``.grad``, never changes module modes or the RNG state.

    Args:
        model: the network. Must not normalize with batch statistics
            (BatchNorm in training mode) nor use dropout in training mode.
        inputs: a tensor, or a (nested) tuple / list / dict batch whose tensors
            share the leading batch dimension ``B``. Tensors are copied onto the
            model's device.
        output_fn: ``output_fn(model, batch) -> Tensor[B, d]`` (or ``[B]``,
            meaning d = 1). Defaults to ``model(batch[0])`` for a tuple or list
            and ``model(batch)`` otherwise.
        params: which parameters form the columns (see
            :func:`~lightning_netsim.core.parameters.select_parameters`);
            default every parameter with ``requires_grad``.
        chunk_size: examples processed at once (bounds memory); default all.

    Returns:
        Tensor of shape ``(B, d, P)`` on the model's device and dtype. Columns
        follow ``model.named_parameters()`` order, each parameter flattened.

    Raises:
        UsageError: no trainable parameter, BatchNorm/dropout in training mode,
            or a model ``torch.func`` cannot transform.
        ValueError: output of the wrong shape, or a batch that cannot be split.
        TypeError: output that is not a floating-point tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> per_sample_jacobian(net, torch.randn(5, 3)).shape
        torch.Size([5, 2, 26])
    """
    engine = JacobianEngine(model, output_fn=output_fn, params=params, chunk_size=chunk_size)
    with grad_mode_for_autograd():
        return engine.jacobian(engine.prepare(inputs))


def _transform_error(model: nn.Module, err: RuntimeError) -> Exception:
    """Explain a ``torch.func`` failure, or pass other errors through."""
    message = str(err)
    if "randomness" in message:
        return UsageError(
            f"{type(model).__name__} draws random numbers in its forward pass (e.g. functional "
            "dropout in training mode), so per-sample Jacobians are random. Fix: call "
            "`model.eval()`, or make the randomness depend on `self.training`."
        )
    if "vmap" in message or "functorch" in message or "torch.func" in message:
        return UsageError(
            f"`torch.func` could not transform {type(model).__name__}: {message}\n"
            "Per-sample Jacobians need a forward pass without data-dependent Python control "
            "flow, `.item()` calls or in-place changes of the inputs. Fix: rewrite that part of "
            "the forward pass, or restrict `params`/`output_fn` to a part of the model that "
            "`torch.func.vmap` supports."
        )
    return err
