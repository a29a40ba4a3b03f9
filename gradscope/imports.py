"""gradscope's own imports never resolve to the watched script's folder.

Python puts the script's folder first on ``sys.path`` (``python train.py``, and ``gradscope run``
does as Python does). A file there named like a module that one of gradscope's dependencies
imports (``html.py``, ``xml.py``, ``packaging.py``, ``zoneinfo.py``...) would be imported in its
place when gradscope first loads pyarrow, pandas or matplotlib, in the middle of a run, and
break the record or the report although the script never imported it.

:func:`own_imports` is entered around the moments gradscope may import something new (a flush,
closing, the report, reading a run back). It looks at the folders Python searches first (the
script's folder, the working directory): only when one of them holds a module that shadows
another importable one does it step those folders out of ``sys.path`` (and such modules out of
``sys.modules``) for the duration, and put everything back after. The scan is cached per folder
and its modification time, so the usual case costs a ``stat``.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from types import ModuleType

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_cache: dict[str, tuple[float, frozenset[str]]] = {}


def _folder_of(entry: str) -> str | None:
    try:
        return os.path.realpath(entry or os.getcwd())
    except OSError:
        return None


def _script_folders() -> set[str]:
    """The folders that Python searches before the installed packages: the main script's and
    the working directory (``''`` on ``sys.path``)."""
    folders = set()
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if isinstance(path, str):
        folder = _folder_of(os.path.dirname(os.path.abspath(path)))
        if folder:
            folders.add(folder)
    if "" in sys.path or "." in sys.path:
        folder = _folder_of("")
        if folder:
            folders.add(folder)
    return folders


def _top_level_names(folder: str) -> frozenset[str]:
    """Module names defined in ``folder`` (``x.py``, ``x/__init__.py``, extension modules),
    cached by the folder's modification time."""
    try:
        mtime = os.stat(folder).st_mtime
    except OSError:
        return frozenset()
    hit = _cache.get(folder)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    suffixes = tuple(importlib.machinery.all_suffixes())
    names: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.endswith(suffixes):
                    names.add(e.name.split(".", 1)[0])
                elif e.is_dir() and os.path.isfile(os.path.join(e.path, "__init__.py")):
                    names.add(e.name)
    except OSError:
        return frozenset()
    found = frozenset(n for n in names if n.isidentifier())
    _cache[folder] = (mtime, found)
    return found


def _shadowing(folders: set[str]) -> tuple[set[str], set[str]]:
    """The names in ``folders`` that shadow a module found elsewhere (the standard library,
    site-packages), and the ``sys.path`` entries to hide."""
    names: set[str] = set()
    for folder in folders:
        names |= _top_level_names(folder)
    names.discard("gradscope")
    if not names:
        return set(), set()
    entries = {e for e in sys.path if _folder_of(e) in folders}
    others = [e for e in sys.path if e not in entries]
    shadow = {
        n
        for n in names
        if n in sys.builtin_module_names
        or importlib.machinery.PathFinder.find_spec(n, others) is not None
    }
    return shadow, entries if shadow else set()


def _under(path: str | None, folders: set[str]) -> bool:
    if not path:
        return False
    real = os.path.realpath(path)
    if real.startswith(_PACKAGE_DIR + os.sep):
        return False
    return any(real.startswith(f + os.sep) for f in folders)


@contextlib.contextmanager
def own_imports() -> Iterator[None]:
    """Imports inside resolve to installed modules, not to the script's folder (see the module
    docstring); everything is put back after: the script's modules return to ``sys.modules``,
    and the installed modules of those names gradscope loaded meanwhile leave it (kept aside
    for the next time), so that a later ``import html`` in the script still finds its own."""
    folders = _script_folders()
    shadow, entries = _shadowing(folders) if folders else (set(), set())
    if not shadow:
        yield
        return

    def shadowed(name: str) -> bool:
        return name.split(".", 1)[0] in shadow

    saved_path = list(sys.path)
    before = {name for name in sys.modules if shadowed(name)}
    hidden = {
        name: mod
        for name, mod in list(sys.modules.items())
        if shadowed(name) and _under(getattr(mod, "__file__", None), folders)
    }
    sys.path[:] = [e for e in sys.path if e not in entries]
    for name in hidden:
        del sys.modules[name]
    sys.modules.update({k: v for k, v in _stash.items() if k not in sys.modules})
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if shadowed(n) and n not in before]:
            _stash[name] = sys.modules.pop(name)
        sys.modules.update(hidden)


_stash: dict[str, ModuleType] = {}  # installed modules named like a script's own, loaded by us
