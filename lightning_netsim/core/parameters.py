"""Which parameters the similarity is taken over, and model checks.

The Jacobian columns follow the order of ``model.named_parameters()``
(shared parameters appear once, under their first name), each parameter
flattened in row-major order.
"""

from collections.abc import Callable, Iterable
from typing import Union

from torch import Tensor, nn

from lightning_netsim.errors import UsageError

__all__ = ["ParamSelection", "check_per_sample_model", "parameter_slices", "select_parameters"]

ParamSelection = Union[
    None,
    Callable[[str, nn.Parameter], bool],
    nn.Module,
    Iterable[Union[str, nn.Module, Tensor]],
]
"""``None`` (all trainable), a predicate ``(name, param) -> bool``, a module,
or an iterable of parameter names, modules and parameter tensors."""


def select_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """Select the trainable parameters the Jacobians are taken with respect to.

    Args:
        model: the network.
        params: ``None`` for every parameter with ``requires_grad``; a predicate
            ``(name, param) -> bool``; a submodule; or an iterable mixing
            parameter names (as in ``named_parameters()``), submodules and
            parameter tensors of ``model``.

    Returns:
        An ordered ``{name: parameter}`` in the order of ``model.named_parameters()``.

    Raises:
        UsageError: nothing trainable is selected, a name is unknown, or a
            selected parameter is frozen or not part of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(select_parameters(net, ["2.bias", net[0]]))
        ['0.weight', '0.bias', '2.bias']
    """
    named = dict(model.named_parameters())
    trainable = {name: p for name, p in named.items() if p.requires_grad}
    if not trainable:
        raise UsageError(
            f"Expected `model` ({type(model).__name__}) to have trainable parameters, but none "
            "has `requires_grad=True`. Fix: unfreeze the layers the similarity should use."
        )
    if params is None:
        return trainable
    if callable(params) and not isinstance(params, nn.Module):
        chosen = {name for name, p in trainable.items() if params(name, p)}
    else:
        chosen = _names_of(model, named, params)
        frozen = sorted(chosen - set(trainable))
        if frozen:
            raise UsageError(
                f"Expected the selected parameters to be trainable, but {frozen} have "
                "`requires_grad=False`. Fix: unfreeze them or leave them out of `params`."
            )
    if not chosen:
        raise UsageError(
            "Expected `params` to select at least one trainable parameter, but it selected none. "
            f"Trainable parameters: {list(trainable)}."
        )
    return {name: p for name, p in trainable.items() if name in chosen}


def _names_of(model: nn.Module, named: dict[str, nn.Parameter], params: ParamSelection) -> set[str]:
    items = [params] if isinstance(params, (nn.Module, str, Tensor)) else list(params)  # type: ignore[arg-type]
    by_id = {id(p): name for name, p in named.items()}
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item not in named:
                raise UsageError(
                    f"Unknown parameter name {item!r} in `params`. "
                    f"Expected one of {list(named)}."
                )
            chosen.add(item)
        elif isinstance(item, nn.Module):
            for p in item.parameters():
                if id(p) not in by_id:
                    raise UsageError(
                        f"The module {type(item).__name__} in `params` is not part of `model`. "
                        "Fix: pass submodules of the model whose similarity you compute."
                    )
                chosen.add(by_id[id(p)])
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise UsageError(
                    f"A tensor of shape {tuple(item.shape)} in `params` is not a parameter of "
                    "`model`. Fix: pass the model's own parameters, names or submodules."
                )
            chosen.add(by_id[id(item)])
        else:
            raise TypeError(
                "Expected `params` to be None, a predicate, a module, or an iterable of "
                f"parameter names, modules and parameters, but got an item of type {type(item).__name__}."
            )
    return chosen


def parameter_slices(selected: dict[str, nn.Parameter]) -> dict[str, slice]:
    """Column range of each selected parameter in a ``[B, d, P]`` Jacobian.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> parameter_slices(select_parameters(net))
        {'weight': slice(0, 6, None), 'bias': slice(6, 8, None)}
    """
    slices: dict[str, slice] = {}
    start = 0
    for name, p in selected.items():
        slices[name] = slice(start, start + p.numel())
        start += p.numel()
    return slices


def check_per_sample_model(model: nn.Module) -> None:
    """Refuse models whose per-sample Jacobians are ill-defined.

    BatchNorm that normalizes with batch statistics (training mode, or no
    running statistics) couples the examples of a batch, so a per-example
    gradient has no meaning; dropout in training mode makes it random.

    Raises:
        UsageError: naming the offending module and the fix.
    """
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            uses_batch_stats = module.training or module.running_mean is None
            if uses_batch_stats:
                raise UsageError(
                    f"BatchNorm module {label!r} normalizes with batch statistics (training mode or "
                    "`track_running_stats=False`), which mixes the examples of a batch, so per-sample "
                    "gradients are meaningless. Fix: call `model.eval()` to use running statistics, "
                    "or use GroupNorm / LayerNorm."
                )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise UsageError(
                f"Dropout module {label!r} is in training mode, which makes per-sample Jacobians "
                "random. Fix: call `model.eval()` before computing similarities."
            )
