r"""Per-sample kernel blocks :math:`K_{ii}` and weighted Jacobian sums, layer by layer, in closed form.

For a layer whose parameters enter as ``out = a Wᵀ + b`` (Linear, and Conv
through unfolded inputs), the Jacobian of output row ``k`` of example ``i``
is :math:`\sum_t g_{kt}^\top a_t` with ``a`` the layer inputs and ``g`` the
gradients of :math:`f_k(x_i)` with respect to the layer outputs. Hence

.. math:: (K_{ii})_{kl} = \sum_{t,s} (g_{kt} \cdot g_{ls}) (a_t \cdot a_s)

(the Gram form; Opacus calls the ``d = 1`` case "ghost norms"), or from the
explicit per-sample weight gradients, whichever costs fewer operations for the
layer's shapes. A weighted sum :math:`\sum_i \sum_k w_{i,mk} J^k_i` is an
ordinary backward with the gradients ``g`` weighted. One forward pass and one
backward to the layer outputs (all d rows at once) give both; no per-sample
Jacobian of the whole model is ever built.

Layers with a closed form (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm,
and BatchNorm with running statistics) are listed in :data:`CLOSED_FORMS`. Any other
module with selected parameters (and any registered one used in a way the
closed form does not cover) is handled by the generic ``torch.func`` path,
per module, so every model works. On the first batch the closed forms are
checked against the generic path on two examples; a module that disagrees
(for instance one whose weight is also used outside it, or which mixes
examples across the batch dimension) is moved to the generic path.
"""

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_netsim.core.jacobians import JacobianEngine, PreparedBatch, _parameter_aliases, math_attention
from lightning_netsim.core.parameters import parameter_slices

__all__ = ["CLOSED_FORMS", "ClosedFormRule", "LayerTerms", "LayerwiseKernels", "Weights"]

Weights = Callable[[Tensor, slice], Tensor]
"""``(K (b, d, d), rows) -> w (b, m, d)``: per-sample weights of a weighted Jacobian sum."""


@dataclass
class _Calls:
    """What a forward hook saw of one module: inputs and (graph-attached) outputs per call."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)
    broken: bool = False


class LayerTerms:
    """One module's share of a batch: its part of :math:`K_{ii}` and of weighted Jacobian sums."""

    def kernel(self) -> Tensor:
        """``(B, d, d)``: the part of :math:`K_{ii}` from this module's selected parameters."""
        raise NotImplementedError

    def weighted(self, w: Tensor) -> dict[str, Tensor]:
        r"""``{attr: (m, *shape)}``: :math:`\sum_i \sum_k w_{i,mk} J^k_i` for weights ``w`` ``(B, m, d)``."""
        raise NotImplementedError


class ClosedFormRule:
    """How to get per-sample kernels and weighted sums of one module type's parameters.

    ``inputs`` and ``grads`` hold one entry per call of the module in the
    forward pass: the input ``(B, ...)`` and the output gradients
    ``(d, B, ...)`` (row ``k`` is the gradient of output ``k`` of each example).
    """

    def supports(self, module: nn.Module) -> bool:
        """Whether the closed form covers this module's configuration."""
        return True

    def bind(self, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> LayerTerms:
        """The terms of the parameters ``attrs`` of ``module`` for one batch."""
        raise NotImplementedError


def _synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_CONV_METHODS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]]" = weakref.WeakKeyDictionary()
"""Per convolution: the faster way found to build its per-sample weight gradients, by shapes and device."""


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _gram_kernel(gram: Tensor, g: Tensor) -> Tensor:
    """``K[b,k,l] = Σ_{t,s} gram[b,t,s] g[k,b,t]·g[l,b,s]`` for ``g`` ``(d, B, T, O)``."""
    mixed = torch.einsum("bts,lbso->lbto", gram, g)
    return torch.einsum("kbto,lbto->bkl", g, mixed)


def _explicit_kernel(per_sample: Tensor) -> Tensor:
    """``(B, d, d)`` Gram of per-sample gradients ``(B, d, ...)``."""
    flat = per_sample.flatten(2)
    return flat @ flat.mT


class _AffineTerms(LayerTerms):
    """Parameters used as ``out_t = W a_t + b`` at positions ``t``: ``a`` ``(B, T, I)``, ``g`` ``(d, B, T, O)``."""

    def __init__(self, shape: torch.Size, attrs: list[str], a: Tensor, g: Tensor) -> None:
        self.shape, self.attrs, self.a, self.g = shape, attrs, a, g
        self.per_sample: Optional[Tensor] = None  # (B, d, O, I) when the explicit form is cheaper

    def kernel(self) -> Tensor:
        d, b, t, o = self.g.shape
        i = self.a.shape[2]
        if t == 1:  # one position: K_ii = (‖a‖² + [bias]) · g gᵀ
            g = self.g[:, :, 0].transpose(0, 1)  # (B, d, O)
            scale = self.a[:, 0].square().sum(1) if "weight" in self.attrs else self.a.new_zeros(b)
            if "bias" in self.attrs:
                scale = scale + 1
            return scale[:, None, None] * (g @ g.mT)
        total = self.a.new_zeros(b, d, d)
        if "weight" in self.attrs:
            explicit = d * t * o * i + d * d * o * i
            gram = t * t * i + d * t * t * o + d * d * t * o
            if gram <= explicit:
                total = total + _gram_kernel(self.a @ self.a.mT, self.g)
            else:
                self.per_sample = torch.einsum("kbto,bti->bkoi", self.g, self.a)
                total = total + _explicit_kernel(self.per_sample)
        if "bias" in self.attrs:
            total = total + _explicit_kernel(self.g.sum(2).transpose(0, 1))
        return total

    def weighted(self, w: Tensor) -> dict[str, Tensor]:
        out = {}
        if self.g.shape[2] == 1:  # one position: plain matrix products
            gw = torch.bmm(w, self.g[:, :, 0].transpose(0, 1))  # (B, m, O)
            if "weight" in self.attrs:
                out["weight"] = (gw.permute(1, 2, 0) @ self.a[:, 0]).reshape(-1, *self.shape)
            if "bias" in self.attrs:
                out["bias"] = gw.sum(0)
            return out
        if "weight" in self.attrs:
            if self.per_sample is not None:
                weight = torch.einsum("bmk,bkoi->moi", w, self.per_sample)
            else:
                weight = torch.einsum("bmk,kbto,bti->moi", w, self.g, self.a)
            out["weight"] = weight.reshape(-1, *self.shape)
        if "bias" in self.attrs:
            out["bias"] = torch.einsum("bmk,kbto->mo", w, self.g)
        return out


class _LinearRule(ClosedFormRule):
    def bind(self, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> LayerTerms:
        b = inputs[0].shape[0]
        a = _cat([x.reshape(b, -1, x.shape[-1]) for x in inputs], 1)
        g = _cat([y.reshape(y.shape[0], b, -1, y.shape[-1]) for y in grads], 2)
        return _AffineTerms(module.weight.shape, attrs, a, g)


class _ConvRule(ClosedFormRule):
    """Conv1d / Conv2d with zero padding and one group, through ``F.unfold``."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def supports(self, module: nn.Module) -> bool:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        return module.groups == 1 and module.padding_mode == "zeros" and self._padding(module) is not None

    def _padding(self, module: nn.Module) -> Optional[tuple[int, ...]]:
        padding = module.padding
        if padding == "valid":
            return (0,) * self.dims
        if padding == "same":
            total = [dil * (k - 1) for dil, k in zip(module.dilation, module.kernel_size)]
            return None if any(p % 2 for p in total) else tuple(p // 2 for p in total)
        return tuple(padding)

    def _unfold(self, module: nn.Module, a: Tensor) -> Tensor:
        padding = self._padding(module)
        assert padding is not None
        size, dilation, stride = module.kernel_size, module.dilation, module.stride
        if self.dims == 1:  # as a 2-D convolution of height one
            a = a.unsqueeze(2)
            size, dilation, padding, stride = (1, *size), (1, *dilation), (0, *padding), (1, *stride)
        # F.unfold measured as fast as or faster than strided window views on CPU (2 cores, batches 32 and 256).
        return F.unfold(a, size, dilation=dilation, padding=padding, stride=stride).mT  # (B, L, C·k)

    def bind(self, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> LayerTerms:
        return _ConvTerms(self, module, attrs, inputs, grads)

    def weight_grad(self, module: nn.Module, a: Tensor, g: Tensor, groups: int = 1) -> Tensor:
        """The convolution's weight gradient for input ``a`` and output gradient ``g`` (torch's own kernel)."""
        padding = self._padding(module)
        fn = torch.nn.grad.conv1d_weight if self.dims == 1 else torch.nn.grad.conv2d_weight
        shape = (g.shape[1], a.shape[1] // groups, *module.kernel_size)
        return fn(a, shape, g, stride=module.stride, padding=padding, dilation=module.dilation, groups=groups)


class _ConvTerms(LayerTerms):
    """Convolution terms: explicit per-sample weight gradients (grouped weight gradients or unfolded
    inputs, whichever is faster), or the Gram form when positions are few relative to channels."""

    def __init__(self, rule: _ConvRule, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> None:
        self.rule, self.module, self.attrs, self.inputs, self.grads = rule, module, attrs, inputs, grads
        self.per_sample: Optional[Tensor] = None  # (B, d, O, C·k)

    def _grouped(self, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
        """Per-sample weight gradients by one grouped weight gradient per output row (examples as groups)."""
        b = inputs[0].shape[0]
        total = None
        for a, g in zip(inputs, grads):
            rows = []
            for k in range(g.shape[0]):
                grad = g[k].reshape(1, -1, *g.shape[3:])
                flat = a.reshape(1, -1, *a.shape[2:])
                rows.append(self.rule.weight_grad(self.module, flat, grad, groups=b).reshape(b, g.shape[2], -1))
            part = torch.stack(rows, 1)
            total = part if total is None else total + part
        assert total is not None
        return total

    def _unfolded(self, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
        """Per-sample weight gradients from unfolded inputs: one batched product for all d rows."""
        a = _cat([self.rule._unfold(self.module, x) for x in inputs], 1)
        g = _cat([y.flatten(3).mT for y in grads], 2)
        return torch.einsum("kbto,bti->bkoi", g, a)

    def _per_sample(self) -> Tensor:
        """``(B, d, O, C·k)`` explicit per-sample weight gradients, by the faster of two ways.

        Grouped weight gradients win for many input channels; unfolding wins for
        few (an RGB input layer) or for many rows. Which is faster depends on the
        shapes, the backend and the device, so the first batch of each module and
        setting times both, twice each on up to 32 of its examples, and keeps the
        faster (both give the same numbers).
        """
        g0 = self.grads[0]
        key = (tuple(tuple(x.shape) for x in self.inputs), g0.shape[0], g0.dtype, g0.device)
        methods = {"grouped": self._grouped, "unfold": self._unfolded}
        known = _CONV_METHODS.setdefault(self.module, {})
        if key not in known:
            n = min(32, g0.shape[1])
            inputs, grads = [x[:n] for x in self.inputs], [y[:, :n] for y in self.grads]
            seconds = dict.fromkeys(methods, float("inf"))
            for _ in range(2):
                for name, fn in methods.items():
                    start = _synchronized_clock(g0.device)
                    fn(inputs, grads)
                    seconds[name] = min(seconds[name], _synchronized_clock(g0.device) - start)
            if len(known) >= 8:
                known.pop(next(iter(known)))
            known[key] = min(seconds, key=seconds.__getitem__)
        return methods[known[key]](self.inputs, self.grads)

    def kernel(self) -> Tensor:
        g0 = self.grads[0]
        d, b, o = g0.shape[:3]
        t = sum(int(torch.tensor(y.shape[3:]).prod()) for y in self.grads)
        i = self.inputs[0].shape[1] * int(torch.tensor(self.module.kernel_size).prod())
        total = g0.new_zeros(b, d, d)
        if "weight" in self.attrs:
            explicit = d * t * o * i + d * d * o * i
            gram = t * t * i + d * t * t * o + d * d * t * o
            if gram < explicit:
                a = _cat([self.rule._unfold(self.module, x) for x in self.inputs], 1)
                g = _cat([y.flatten(3).mT for y in self.grads], 2)
                total = total + _gram_kernel(a @ a.mT, g)
            else:
                self.per_sample = self._per_sample()
                total = total + _explicit_kernel(self.per_sample)
        if "bias" in self.attrs:
            bias = sum(y.flatten(3).sum(3) for y in self.grads)  # (d, B, O)
            total = total + _explicit_kernel(bias.transpose(0, 1))  # type: ignore[union-attr]
        return total

    def weighted(self, w: Tensor) -> dict[str, Tensor]:
        out = {}
        mixed = [torch.einsum("bmk,kb...->mb...", w, y) for y in self.grads]  # (m, B, O, ...)
        if "weight" in self.attrs:
            if self.per_sample is not None:
                weight = torch.einsum("bmk,bkoi->moi", w, self.per_sample)
            else:  # an ordinary weight gradient per row m, with the mixed output gradients
                weight = sum(
                    torch.stack([self.rule.weight_grad(self.module, a, gw[m]) for m in range(gw.shape[0])]).flatten(2)
                    for a, gw in zip(self.inputs, mixed)
                )
            out["weight"] = weight.reshape(-1, *self.module.weight.shape)  # type: ignore[union-attr]
        if "bias" in self.attrs:
            out["bias"] = sum(gw.flatten(3).sum((1, 3)) for gw in mixed)  # type: ignore[assignment]
        return out


class _EmbeddingTerms(LayerTerms):
    def __init__(self, module: nn.Embedding, idx: Tensor, g: Tensor) -> None:
        self.module, self.idx, self.g = module, idx, g

    def kernel(self) -> Tensor:
        return _gram_kernel((self.idx[:, :, None] == self.idx[:, None, :]).to(self.g.dtype), self.g)

    def weighted(self, w: Tensor) -> dict[str, Tensor]:
        gw = torch.einsum("bmk,kbto->mbto", w, self.g)
        m, dim = gw.shape[0], gw.shape[-1]
        total = gw.new_zeros(m, self.module.num_embeddings, dim)
        return {"weight": total.index_add_(1, self.idx.reshape(-1), gw.reshape(m, -1, dim))}


class _EmbeddingRule(ClosedFormRule):
    """Embedding lookups: examples share a gradient row only where they look up the same index."""

    def supports(self, module: nn.Module) -> bool:
        assert isinstance(module, nn.Embedding)
        return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq

    def bind(self, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> LayerTerms:
        b = inputs[0].shape[0]
        idx = _cat([a.reshape(b, -1) for a in inputs], 1)
        g = _cat([y.reshape(y.shape[0], b, -1, y.shape[-1]) for y in grads], 2)
        if module.padding_idx is not None:  # the padding row gets no gradient
            g = g * (idx != module.padding_idx).to(g.dtype)[None, :, :, None]
        assert isinstance(module, nn.Embedding)
        return _EmbeddingTerms(module, idx, g)


class _ExplicitTerms(LayerTerms):
    """Small parameters: explicit per-sample gradients ``{attr: (d, B, *shape)}``."""

    def __init__(self, per_sample: dict[str, Tensor]) -> None:
        self.per_sample = per_sample

    def kernel(self) -> Tensor:
        return sum(_explicit_kernel(v.transpose(0, 1)) for v in self.per_sample.values())  # type: ignore[return-value]

    def weighted(self, w: Tensor) -> dict[str, Tensor]:
        return {attr: torch.einsum("bmk,kb...->m...", w, v) for attr, v in self.per_sample.items()}


class _NormRule(ClosedFormRule):
    """Affine parameters of LayerNorm / GroupNorm: explicit per-sample gradients (they are small)."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce(self, module: nn.Module, values: Tensor) -> Tensor:
        """Sum ``(d, B, *input)`` over the positions sharing a parameter → ``(d, B, *param)``."""
        raise NotImplementedError

    def bind(self, module: nn.Module, attrs: list[str], inputs: list[Tensor], grads: list[Tensor]) -> LayerTerms:
        out: dict[str, Tensor] = {}
        for a, g in zip(inputs, grads):
            parts = {}
            if "weight" in attrs:
                parts["weight"] = self.reduce(module, g * self.normalized(module, a).to(g.dtype))
            if "bias" in attrs:
                parts["bias"] = self.reduce(module, g)
            for attr, value in parts.items():
                out[attr] = out[attr] + value if attr in out else value
        return _ExplicitTerms(out)


class _LayerNormRule(_NormRule):
    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)

    def reduce(self, module: nn.Module, values: Tensor) -> Tensor:
        keep = len(module.normalized_shape)
        middle = tuple(range(2, values.ndim - keep))
        return values.sum(middle) if middle else values


class _GroupNormRule(_NormRule):
    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        return F.group_norm(a, module.num_groups, eps=module.eps)

    def reduce(self, module: nn.Module, values: Tensor) -> Tensor:
        spatial = tuple(range(3, values.ndim))
        return values.sum(spatial) if spatial else values


class _BatchNormRule(_NormRule):
    """BatchNorm with running statistics (eval mode): a fixed per-channel affine map of the input."""

    def supports(self, module: nn.Module) -> bool:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        return not module.training and module.running_mean is not None and module.running_var is not None

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (a.ndim - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)  # type: ignore[union-attr]
        return (a - mean) / torch.sqrt(var + module.eps)

    def reduce(self, module: nn.Module, values: Tensor) -> Tensor:
        spatial = tuple(range(3, values.ndim))
        return values.sum(spatial) if spatial else values


CLOSED_FORMS: dict[type, ClosedFormRule] = {
    nn.Linear: _LinearRule(),
    nn.Conv1d: _ConvRule(1),
    nn.Conv2d: _ConvRule(2),
    nn.Embedding: _EmbeddingRule(),
    nn.LayerNorm: _LayerNormRule(),
    nn.GroupNorm: _GroupNormRule(),
    nn.BatchNorm1d: _BatchNormRule(),
    nn.BatchNorm2d: _BatchNormRule(),
    nn.BatchNorm3d: _BatchNormRule(),
}
"""Module types (exact, not subclasses: those may change ``forward``) with a closed form."""


_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, frozenset[str]]]" = weakref.WeakKeyDictionary()
"""Per model: which registered modules the first-batch check sent to the generic path, by setting."""


@dataclass
class _Registered:
    module: nn.Module
    rule: ClosedFormRule
    attrs: list[str]
    names: list[str]  # selected parameter names, in the order of ``attrs``


class LayerwiseKernels:
    """Per-sample :math:`K_{ii}` and weighted sums of Jacobians for one engine, closed form where possible.

    Args:
        engine: the model, output function and parameter selection.
        validate: check the closed forms against the generic path on two
            examples of the first batch (and demote the modules that disagree).
    """

    def __init__(self, engine: JacobianEngine, *, validate: bool = True) -> None:
        self.engine = engine
        self.validate = validate
        name_of = {id(p): name for name, p in engine.selected.items()}
        aliases = _parameter_aliases(engine.model)
        self.registered: list[_Registered] = []
        for module in dict.fromkeys(m for _, m in engine.model.named_modules()):
            rule = CLOSED_FORMS.get(type(module))
            own = [(attr, p) for attr, p in module.named_parameters(recurse=False) if id(p) in name_of]
            if rule is None or not own or not rule.supports(module):
                continue
            if any(len(aliases[id(p)]) > 1 for _, p in own):  # tied to another module
                continue
            self.registered.append(_Registered(module, rule, [a for a, _ in own], [name_of[id(p)] for _, p in own]))
        self._fallback_engine: Optional[JacobianEngine] = None
        self._update_fallback()
        self._clone_outputs = False  # set once an output is seen changed in place
        self._changed_in_place = False

    @property
    def fallback_names(self) -> list[str]:
        """Selected parameters handled by the generic ``torch.func`` path."""
        covered = {n for r in self.registered for n in r.names}
        return [n for n in self.engine.selected if n not in covered]

    def _update_fallback(self) -> None:
        names = self.fallback_names
        self._fallback_engine = None
        if names:
            self._fallback_engine = JacobianEngine(
                self.engine.model,
                output_fn=self.engine.output_fn,
                params=names,
                chunk_size=self.engine.chunk_size,
            )

    def _capture(self, batch: PreparedBatch) -> tuple[Tensor, dict[int, _Calls]]:
        """Forward pass with hooks on the registered modules; outputs keep their graph."""
        calls: dict[int, _Calls] = {id(r.module): _Calls() for r in self.registered}
        size = batch.size

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            seen = calls[id(module)]
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                seen.broken = True
                return None
            a = args[0]
            if a.ndim == 0 or output.ndim == 0 or a.shape[0] != size or output.shape[0] != size:
                seen.broken = True  # the batch dimension is not leading: rows would mix examples
                return None
            seen.inputs.append(a.detach())
            seen.versions.append(a._version)
            seen.outputs.append(output)
            seen.output_versions.append(output._version)
            # Later in-place ops (ReLU(inplace=True)) must not change what we differentiate by.
            return output.clone() if self._clone_outputs else None

        handles: list[RemovableHandle] = [r.module.register_forward_hook(hook) for r in self.registered]
        try:
            theta = {name: t.requires_grad_() for name, t in self.engine.theta().items()}
            out = self.engine._call(theta, batch.rebuild(batch.leaves))
        finally:
            for handle in handles:
                handle.remove()
        for seen in calls.values():
            if any(a._version != v for a, v in zip(seen.inputs, seen.versions)):
                seen.broken = True  # an input was changed in place after the layer used it
            if any(t._version != v for t, v in zip(seen.outputs, seen.output_versions)):
                self._changed_in_place = True
        return out, calls

    def _output_grads(self, out: Tensor, calls: dict[int, _Calls]) -> dict[int, list[Tensor]]:
        targets = [(key, i, t) for key, seen in calls.items() if not seen.broken for i, t in enumerate(seen.outputs)]
        b, d = out.shape
        # A call made without autograd (e.g. under no_grad inside forward) does not move the output:
        # its gradient, like an unused one, is zero (allocated only then).
        grads_of: dict[int, list[Optional[Tensor]]] = {key: [None] * len(calls[key].outputs) for key, _, _ in targets}

        def result() -> dict[int, list[Tensor]]:
            return {
                key: [t.new_zeros(d, *t.shape) if g is None else g for g, t in zip(found, calls[key].outputs)]
                for key, found in grads_of.items()
            }

        targets = [(key, i, t) for key, i, t in targets if t.requires_grad]
        if not targets or not out.requires_grad:
            return result()
        eye = torch.eye(d, dtype=out.dtype, device=out.device)
        tensors = [t for _, _, t in targets]
        if d == 1:
            grads = torch.autograd.grad(out, tensors, torch.ones_like(out), allow_unused=True)
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            seeds = eye[:, None, :].expand(d, b, d)
            try:
                grads = torch.autograd.grad(
                    out, tensors, seeds, is_grads_batched=True, allow_unused=True, retain_graph=True
                )
            except RuntimeError:  # an op without a batching rule for its backward: one row at a time
                rows = [torch.autograd.grad(out, tensors, seeds[k], allow_unused=True, retain_graph=True) for k in range(d)]
                grads = tuple(
                    None if parts[0] is None else torch.stack(parts) for parts in zip(*rows)  # type: ignore[misc]
                )
        for (key, i, _), g in zip(targets, grads):
            grads_of[key][i] = g
        return result()

    def _demote(self, broken: set[int]) -> None:
        self.registered = [r for r in self.registered if id(r.module) not in broken]
        self._update_fallback()

    def compute(
        self, batch: PreparedBatch, weights: Optional[Weights] = None
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        r"""Outputs ``(B, d)``, :math:`K_{ii}` ``(B, d, d)`` and, with ``weights``, a weighted sum.

        Args:
            batch: a prepared batch, processed in chunks of the engine's ``chunk_size``.
            weights: ``(K_chunk (b, d, d), rows) -> w (b, m, d)`` for the examples
                ``rows`` (a slice of the batch); then the third result is
                :math:`\sum_i \sum_k w_{i,mk} J^k_i` as ``(m, P)``.
        """
        step = self.engine.chunk_size or batch.size
        outs, kernels, total = [], [], None
        for start in range(0, batch.size, step):
            rows = slice(start, min(start + step, batch.size))
            chunk = batch if step >= batch.size else PreparedBatch(
                [t[rows] for t in batch.leaves], batch.rebuild, rows.stop - rows.start
            )
            out, kernel, part = self._compute_chunk(chunk, None if weights is None else lambda k, r=rows: weights(k, r))
            outs.append(out)
            kernels.append(kernel)
            if part is not None:
                total = part if total is None else total + part
        return torch.cat(outs), torch.cat(kernels), total

    def _compute_chunk(
        self, batch: PreparedBatch, weights: Optional[Callable[[Tensor], Tensor]]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        while True:
            with torch.enable_grad(), torch.inference_mode(False), math_attention():
                out, calls = self._capture(batch)
                if self._changed_in_place and not self._clone_outputs:
                    self._clone_outputs = True  # copy layer outputs from now on, and redo this batch
                    continue
                broken = {key for key, seen in calls.items() if seen.broken}
                if broken:
                    self._demote(broken)
                    continue
                grads = self._output_grads(out, calls)
            out = out.detach()
            b, d = out.shape
            terms = {
                id(r.module): r.rule.bind(r.module, r.attrs, calls[id(r.module)].inputs, grads[id(r.module)])
                for r in self.registered
                if id(r.module) in grads  # a module never called contributes nothing
            }
            parts = {key: t.kernel() for key, t in terms.items()}
            fallback_jac = self._fallback_engine.jacobian(batch) if self._fallback_engine is not None else None
            if self.validate:
                self.validate = False
                key = self._verdict_key(batch)
                known = _VERDICTS.get(self.engine.model, {}).get(key)
                if known is not None:  # this model and setting were checked by an earlier call
                    wrong = {id(r.module) for r in self.registered if r.names[0] in known}
                else:
                    wrong = self._disagreeing(batch, parts, fallback_jac)
                    names = frozenset(r.names[0] for r in self.registered if id(r.module) in wrong)
                    verdicts = _VERDICTS.setdefault(self.engine.model, {})
                    if len(verdicts) >= 8:
                        verdicts.pop(next(iter(verdicts)))
                    verdicts[key] = names
                if wrong:
                    self._demote(wrong)
                    continue
            kernel = sum(parts.values(), out.new_zeros(b, d, d))
            if fallback_jac is not None:
                kernel = kernel + fallback_jac @ fallback_jac.mT
            if weights is None:
                return out, kernel, None
            w = weights(kernel)
            pieces: dict[str, Tensor] = {}
            for r in self.registered:
                if id(r.module) in terms:
                    sums = terms[id(r.module)].weighted(w)
                    pieces.update((name, sums[attr]) for attr, name in zip(r.attrs, r.names))
            if fallback_jac is not None:
                flat = torch.einsum("bmk,bkp->mp", w, fallback_jac)
                pieces.update(self._fallback_engine.unflatten(flat))  # type: ignore[union-attr]
            m = w.shape[1]
            total = torch.cat(
                [
                    pieces[name].reshape(m, -1) if name in pieces else w.new_zeros(m, p.numel())
                    for name, p in self.engine.selected.items()
                ],
                dim=1,
            )
            return out, kernel, total

    def _verdict_key(self, batch: PreparedBatch) -> tuple:
        shapes = tuple((tuple(t.shape[1:]), t.dtype) for t in batch.leaves)
        return (self.engine.output_fn, tuple(self.engine.selected), shapes)

    def _disagreeing(self, batch: PreparedBatch, parts: dict[int, Tensor], fallback_jac: Optional[Tensor]) -> set[int]:
        """Registered modules whose closed form differs from the generic path on two examples."""
        if not self.registered:
            return set()
        rows = sorted({0, batch.size - 1})
        index = torch.tensor(rows, device=self.engine.device)
        sample = PreparedBatch([t.index_select(0, index.to(t.device)) for t in batch.leaves], batch.rebuild, len(rows))
        reference = self.engine.jacobian(sample)
        slices = parameter_slices(self.engine.selected)
        tol = 1e3 * torch.finfo(reference.dtype).eps
        wrong = set()
        for r in self.registered:
            cols = torch.cat([reference[..., slices[name]] for name in r.names], dim=-1)
            expected = cols @ cols.mT
            got = parts[id(r.module)][rows] if id(r.module) in parts else torch.zeros_like(expected)
            scale = expected.abs().amax() + got.abs().amax()
            if (got - expected).abs().amax() > tol * scale + torch.finfo(reference.dtype).tiny:
                wrong.add(id(r.module))
        return wrong
