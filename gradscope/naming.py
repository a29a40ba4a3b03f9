"""Which module to watch, and what to call it: ``watch()``'s arguments made plain.

A model reaches gradscope wrapped in many ways (``torch.compile``'s ``OptimizedModule``,
``DistributedDataParallel``, ``DataParallel``, FSDP), in a list or a dict (a GAN's two
networks), or is found by ``gradscope run`` at its first training forward pass. These functions
give the module whose hooks run and whose names a user knows, and a label for the run's
directory name. Shared by :func:`gradscope.watch` and ``gradscope run``'s discovery
(:mod:`gradscope.attach`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def wrapped(module: nn.Module) -> nn.Module:
    """The module a wrapper runs: torch.compile's OptimizedModule, DDP, DataParallel. FSDP1
    stays: its flat parameters live on the wrapper (their names are cleaned instead)."""
    for _ in range(4):  # torch.compile(DDP(model)) and the like
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(
            module, (nn.DataParallel, nn.parallel.DistributedDataParallel)
        ):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def unwrap(m: Any) -> Any:
    """:func:`wrapped` for modules; anything else unchanged (checked by the caller)."""
    return wrapped(m) if isinstance(m, nn.Module) else m


def model_label(m: nn.Module) -> str:
    """The class name a user knows: FSDP2's ``fully_shard`` makes ``FSDPNet`` of ``Net``,
    FSDP1 wraps the model."""
    inner = getattr(m, "_fsdp_wrapped_module", None)
    if isinstance(inner, nn.Module):
        m = inner
    name = type(m).__name__
    if name.startswith("FSDP") and any(b.__name__ == name[4:] for b in type(m).__mro__[1:]):
        return name[4:]  # FSDP2's class(FSDPModule, Sequential)
    return name


def holds_compiled(root: nn.Module) -> bool:
    """Whether ``root`` is compiled in place or holds a compiled submodule (an
    ``OptimizedModule``, or one compiled with ``Module.compile()``)."""
    for m in root.modules():
        if "_orig_mod" in m._modules or m.__dict__.get("_compiled_call_impl") is not None:
            return True
    return False


def compiled_callers(models: Any) -> dict[int, nn.Module]:
    """The ``torch.compile`` wrappers among ``watch()``'s models, by the id of the module each
    runs: what the user calls, and where hooks still run eagerly (the replay keeps its calls
    there; the module's own hooks run inside the compiled graph)."""
    if isinstance(models, nn.Module):
        items = [models]
    elif isinstance(models, Mapping):
        items = list(models.values())
    elif isinstance(models, Iterable) and not isinstance(models, (str, bytes)):
        items = list(models)
    else:
        return {}
    return {
        id(wrapped(m)): m
        for m in items
        if isinstance(m, nn.Module) and isinstance(getattr(m, "_orig_mod", None), nn.Module)
    }


def normalize_models(models: Any) -> tuple[dict[str, nn.Module], str]:
    """``watch()``'s first argument as ``{prefix: module}`` plus a label for the run name.

    Raises:
        TypeError: Not a module, nor a non-empty list or dict of modules.
        ValueError: A dict key is empty or holds a ``.``.
    """

    def bad(value: Any) -> TypeError:
        return TypeError(
            f"watch() expects an nn.Module, or a list or dict of them; got "
            f"{type(value).__name__} ({value!r:.60})"
        )

    if isinstance(models, nn.Module):
        m = unwrap(models)
        return {"": m}, model_label(m)
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, Iterable) and not isinstance(models, (str, bytes)):
        mods = list(models)
        names = [model_label(unwrap(m)) for m in mods]
        keys = names if len(set(names)) == len(names) else [str(i) for i in range(len(mods))]
        items = list(zip(keys, mods))
    else:
        raise bad(models)
    if not items:
        raise bad(models)
    out: dict[str, nn.Module] = {}
    for key, m in items:
        if not isinstance(m, nn.Module):
            raise bad(m)
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"watch(): model key {key!r} must be a non-empty string without '.'")
        out[key] = unwrap(m)
    return out, "-".join(model_label(m) for m in out.values())


def normalize_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """``watch()``'s ``optimizer`` argument as a list (empty: found at the first step).

    Raises:
        TypeError: Something that is not a ``torch.optim.Optimizer``.
    """
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(opts, Iterable):
        opts = [opts]
    out = list(opts)
    for opt in out:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer={opt!r:.60}: expected a torch.optim.Optimizer (or a list of them), "
                f"got {type(opt).__name__}"
            )
    return out


def first_device(models: Mapping[str, nn.Module]) -> torch.device:
    """Where the first parameter of the first model lives (CPU for a model without any)."""
    for model in models.values():
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def model_key(models: Mapping[str, nn.Module], model: nn.Module, key: str | None) -> str:
    """The prefix ``model`` is watched under in ``models``: ``key``, or the one it already has,
    or its class name made unique with a ``_1``, ``_2``... suffix.

    Raises:
        ValueError: ``key`` is not a plain name, or names another model already.
    """
    if key is None:
        key = next((k for k, m in models.items() if m is model), None)
        if key is None:
            base = key = model_label(model)
            n = 0
            while key in models:
                n += 1
                key = f"{base}_{n}"
    if not isinstance(key, str) or "." in key or (not key and "" not in models):
        raise ValueError(f"add_model(): key {key!r} must be a non-empty string without '.'")
    if key in models and models[key] is not model:
        raise ValueError(
            f"add_model(): key {key!r} already names another model ({type(models[key]).__name__})"
        )
    return key
