"""What differs between the torch releases gradscope accepts (``torch>=2.2``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

is_compiling: Callable[[], bool] = (
    getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling
)
"""Whether dynamo is tracing the caller (``torch.compiler.is_compiling`` from torch 2.3; on 2.2
``torch._utils.is_compiling``, which dynamo also treats as a constant ``True``)."""
