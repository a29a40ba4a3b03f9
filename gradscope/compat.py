"""What differs between the torch releases gradscope accepts (``torch>=2.2``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

is_compiling: Callable[[], bool] = (
    getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling
)
"""Whether dynamo is tracing the caller (``torch.compiler.is_compiling`` from torch 2.3; on 2.2
``torch._utils.is_compiling``, which dynamo also treats as a constant ``True``)."""


def cpu_autocast() -> torch.dtype | None:
    """The dtype CPU autocast casts to where it is on, else None (``torch.is_autocast_enabled``
    and ``get_autocast_dtype`` take a device type from torch 2.4; 2.2-2.3 have the
    ``*_cpu_*`` forms)."""
    try:
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return None
    except TypeError:  # torch < 2.4
        if torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None
