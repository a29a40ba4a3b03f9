"""gradscope: find and treat gradient pathologies in PyTorch training.

>>> import gradscope
>>> with gradscope.watch(model) as scope:      # doctest: +SKIP
...     train(model)
>>> scope.load().wide("grad_norm")             # doctest: +SKIP

``import gradscope`` is light: it imports nothing heavy, not even torch. Every public name loads
its module on first use (``gradscope.watch``, ``gradscope.Scope`` import torch; pandas, pyarrow,
matplotlib and tensorboard load later still, when something needs them), so the command line
answers ``--help`` and a usage error without importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import Config as Config
    from .load import Run as Run
    from .remedies import NonfiniteStepsError as NonfiniteStepsError
    from .remedies import swap_activations as swap_activations
    from .scope import Scope as Scope

__all__ = [
    "Config",
    "NonfiniteStepsError",
    "Run",
    "Scope",
    "__version__",
    "load_run",
    "swap_activations",
    "watch",
]


def watch(
    model: Any,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    **config: Any,
) -> Scope:
    """Watch ``model`` while it trains; returns an open :class:`Scope`.

    Use it as a context manager (``with gradscope.watch(model): ...``) or keep the handle and call
    ``close()``; an unclosed scope closes at interpreter exit. A scope still open on the same
    model (or, in a notebook, opened by an earlier run of the same cell) is closed first, with
    a line saying so: hooks are never doubled (``docs/notebooks.md``).

    Args:
        model: An ``nn.Module`` (a ``torch.compile``d one too), or a list or dict of modules
            watched as one run (a GAN's generator and discriminator); dict keys prefix names.
        optimizer: The optimizer(s) that step ``model``. Default: found automatically, from
            the first ``step()`` of any optimizer holding the model's parameters. Loops with no
            optimizer count each backward pass as a step (or call ``scope.step()``).
        **config: Any :class:`Config` field (``out``, ``name``, ``flush_every``,
            ``activation_every``, ``include``, ``exclude``, ``clip``...). Defaults for a project
            can sit in the ``[tool.gradscope]`` table of the nearest ``pyproject.toml`` at or
            above the working directory; keywords given here win over it.

    Raises:
        TypeError: ``model`` is not a module, or an unknown config key (named, with the accepted
            ones).
        ValueError: A config value is out of range, or the output root is not writable. Nothing
            is written when either error is raised.
    """
    from .naming import compiled_callers, normalize_models, normalize_optimizers
    from .scope import Scope, supersede

    cfg = resolve_config(**config)
    models, label = normalize_models(model)
    optimizers = normalize_optimizers(optimizer)
    supersede(models)
    return Scope(models, optimizers, cfg, label, callers=compiled_callers(model))


def resolve_config(**config: Any) -> Config:
    """The configuration ``watch(**config)`` runs with: the ``[tool.gradscope]`` table of the
    nearest ``pyproject.toml``, overridden by ``config``, validated.

    Raises:
        TypeError, ValueError: As :func:`watch`.
    """
    from .config import Config, project_options

    project, path = project_options()
    if project:  # the project's defaults; keywords given here win
        try:
            Config.from_kwargs(**project)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{path} [tool.gradscope]: {exc}") from None
    return Config.from_kwargs(**{**project, **config})


def load_run(path: Any) -> Run:
    """Read a run directory back (see :func:`gradscope.load.load_run`)."""
    from .load import load_run as _load_run

    return _load_run(path)


_LAZY = {
    "Config": ".config",
    "NonfiniteStepsError": ".remedies",
    "Run": ".load",
    "Scope": ".scope",
    "swap_activations": ".remedies",
}
"""The public names that load their module on first access (PEP 562)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
