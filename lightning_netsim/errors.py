"""The one exception type for misuse of the library's API."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Raised when the library is used in a way it cannot honour.

    Examples: a model with no trainable parameters, BatchNorm in training mode
    (per-sample gradients are ill-defined there), or a model that
    ``torch.func`` cannot transform. Every message says what was expected,
    what was found and how to fix it. It subclasses :class:`ValueError`, so
    code that already catches bad values keeps working.
    """
