"""``gradscope run``: run a script or module exactly as ``python`` would, with gradscope attached.

"Exactly" means what a script can observe:

* ``sys.argv``: ``[script as typed, *args]``; for ``-m``, ``[the module's file, *args]`` (``-m``
  while the module is located, as Python does).
* ``__main__``: a fresh module, as Python's own: ``__name__ == "__main__"``, ``__file__``
  absolute, ``__spec__`` None for a file; the module's spec under ``-m``. Classes defined in the
  script pickle as ``__main__.X`` (``torch.save(model)``), and ``multiprocessing``'s spawn start
  method finds the script through it.
* ``sys.path[0]``: the script's folder (symlinks resolved); the working directory under ``-m``.
  The working directory and the environment are left alone.
* The end: an uncaught exception prints the script's traceback as Python prints it (through
  ``sys.excepthook``, the script's own if it set one, without gradscope's frames) and exits 1;
  ``sys.exit(n)`` exits ``n``; Ctrl-C prints the KeyboardInterrupt traceback and ends the
  process by SIGINT, as Python does (130 in a shell). SIGTERM, which Python does not catch,
  closes the run first, then ends the process by SIGTERM as before.

The run directory is closed in every one of these cases, before the exception is printed:
status ``completed`` (exit 0), ``failed`` (an exception or a non-zero exit) or ``interrupted``,
with the exit code in run.json.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.machinery
import importlib.util
import os
import runpy
import signal
import sys
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .guard import EXIT, Deliberate
from .interrupts import held
from .meta import RunStatus, status_for

PYC_SUFFIXES = tuple(importlib.machinery.BYTECODE_SUFFIXES)
SOURCE_SUFFIXES = (".py", ".pyw")


class TargetError(ValueError):
    """The script or module cannot be run (one line, for the command line: exit code 2)."""


@dataclass
class Target:
    """What to run: a file (``script``), a folder or zip with ``__main__.py`` (``main``), or a
    module (``module``)."""

    kind: str
    name: str  # as typed
    path: Path | None = None  # absolute, for files and folders
    code: types.CodeType | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        return f"-m {self.name}" if self.kind == "module" else self.name


def resolve_script(name: str) -> Target:
    """Check ``name`` the way ``python name`` would, before anything runs.

    Raises:
        TargetError: It does not exist, is a folder without ``__main__.py``, or is not Python
            (binary, or text that does not compile and does not end in ``.py``).
    """
    path = Path(name)
    if not path.exists():
        raise TargetError(f"{name}: no such file")
    absolute = Path(os.path.abspath(name))
    if path.is_dir():
        if not (path / "__main__.py").is_file():
            raise TargetError(
                f"{name}: is a directory without a __main__.py (expected a Python "
                "script, or a folder with __main__.py)"
            )
        return Target("main", name, absolute)
    if not path.is_file():
        raise TargetError(f"{name}: not a regular file (expected a Python script)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TargetError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if "__main__.py" not in zf.namelist():
                raise TargetError(f"{name}: a zip file without a __main__.py")
        return Target("main", name, absolute)
    if path.suffix in PYC_SUFFIXES:
        import pkgutil

        with open(path, "rb") as fh:
            code = pkgutil.read_code(fh)
        if code is None:
            raise TargetError(
                f"{name}: not bytecode of this Python "
                f"({sys.version_info.major}.{sys.version_info.minor})"
            )
        return Target("script", name, absolute, code)
    if b"\0" in data:
        raise TargetError(f"{name}: not a Python file (it holds binary data)")
    try:
        code = compile(data, str(absolute), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        if path.suffix not in SOURCE_SUFFIXES:
            raise TargetError(
                f"{name}: not a Python file ({type(exc).__name__}: "
                f"{getattr(exc, 'msg', exc)}, line {getattr(exc, 'lineno', '?')})"
            ) from None
        code = None  # the script's own syntax error: Python reports it when it runs
    return Target("script", name, absolute, code)


def resolve_module(name: str) -> Target:
    """Check that ``python -m name`` would find something to run (importing its parent
    packages, as Python does).

    Raises:
        TargetError: No such module, or a package without ``__main__``.
    """
    if not name or any(not part.isidentifier() for part in name.split(".")):
        raise TargetError(
            f"-m {name!r}: not a module name (expected dotted identifiers, e.g. 'package.train')"
        )
    with _path_first(os.getcwd()):
        try:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.submodule_search_locations is not None:
                main = importlib.util.find_spec(f"{name}.__main__")
                if main is None:
                    raise TargetError(f"-m {name}: a package without a __main__ module")
        except TargetError:
            raise
        except Exception as exc:  # ImportError, or a parent package that raised
            raise TargetError(f"-m {name}: cannot be found ({type(exc).__name__}: {exc})") from None
    if spec is None:
        raise TargetError(
            f"-m {name}: no module named {name!r} (looked in the working directory and sys.path)"
        )
    return Target("module", name)


@contextlib.contextmanager
def _path_first(entry: str) -> Iterator[None]:
    saved = sys.path[:]
    sys.path[:1] = [entry]
    try:
        yield
    finally:
        sys.path[:] = saved


@dataclass
class Outcome:
    """How the script ended, for :func:`finish`."""

    exception: BaseException | None
    status: str
    exit_code: int
    run_dir: Path | None
    main_globals: dict[str, Any]
    script: Path | None = None


def launcher_argv() -> list[str]:
    """How gradscope itself was started, for run.json (``gradscope run ...``)."""
    first = Path(sys.argv[0]).name
    head = ["python", "-m", "gradscope"] if first == "__main__.py" else [first]
    return [*head, *sys.argv[1:]]


def run(target: Target, args: list[str], config: Config) -> Outcome:
    """Run ``target`` with ``args`` as its command line, watched under ``config``. Returns
    after the script ended, however it ended, with the run directory written."""
    from .attach import Attach

    command = launcher_argv()
    main = _prepare(target, args)
    attach = Attach(config, command)
    ended = threading.Event()
    restore = _on_sigterm(attach, ended)
    try:
        try:
            _execute(target, main)
            exc: BaseException | None = None
        except BaseException as caught:  # the script's: everything, SystemExit included
            exc = caught
        status, code = _classify(exc)
        with held(deliver=False):  # the script already ended: a Ctrl-C waits, then nothing
            ended.set()
            run_dir = attach.guard.isolate(EXIT, "close", attach.close, status, code)
    finally:
        restore()
    return Outcome(exc, status, code, run_dir, main.__dict__, target.path)


def launch_workers(nproc: str, run_args: list[str]) -> int:
    """``gradscope run --nproc-per-node N ...``: PyTorch's own launcher starts the processes
    (``python -m torch.distributed.run --standalone --nproc-per-node N -m gradscope run ...``),
    each one runs the script under gradscope, and rank 0 writes the run directory. Returns
    the launcher's exit code (128 + the signal, if a signal ended it); SIGTERM is passed on."""
    import subprocess

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        nproc,
        "-m",
        "gradscope",
        "run",
        *run_args,
    ]
    proc = subprocess.Popen(command)
    restore = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
        restore = previous
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the launcher too: it stops the workers
                continue
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    return 128 - code if code < 0 else code


def finish(outcome: Outcome) -> int:
    """End as Python would have: return the exit code, or re-raise the script's exception for
    the interpreter to print (through ``sys.excepthook``, trimmed to the script's frames) and
    turn into the exit status (1, or death by SIGINT for Ctrl-C)."""
    exc = outcome.exception
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, Deliberate):  # the guard= remedy stopped the run, as asked: say why
        text = str(exc)
        print(
            text if text.startswith("gradscope") else f"gradscope: {text}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    sys.excepthook = _trimming(sys.excepthook, outcome.main_globals, outcome.script)
    raise exc


def _classify(exc: BaseException | None) -> tuple[str, int]:
    """The run's status (:func:`gradscope.meta.status_for`) and the exit code python gives."""

    status = str(status_for(exc))
    if exc is None:
        return status, 0
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or isinstance(code, int):
            return status, code or 0
        return status, 1  # sys.exit("message"): printed on stderr, exit status 1
    if isinstance(exc, KeyboardInterrupt):
        return status, 128 + signal.SIGINT
    return status, 1


def _prepare(target: Target, args: list[str]) -> types.ModuleType:
    """Set up sys.argv, sys.path[0] and a fresh ``__main__`` as Python would."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if target.kind == "script":
        assert target.path is not None
        loader_cls = (
            importlib.machinery.SourcelessFileLoader
            if target.path.suffix in PYC_SUFFIXES
            else importlib.machinery.SourceFileLoader
        )
        main.__dict__.update(
            __file__=str(target.path),
            __cached__=None,
            __package__=None,
            __spec__=None,
            __loader__=loader_cls("__main__", str(target.path)),
            __annotations__={},
        )
        sys.argv[:] = [target.name, *args]
        sys.path[0] = os.path.dirname(os.path.realpath(target.path))
    elif target.kind == "main":
        sys.argv[:] = [target.name, *args]
        sys.path[0] = str(target.path)
    else:
        sys.argv[:] = ["-m", *args]
        sys.path[0] = os.getcwd()
    sys.modules["__main__"] = main
    return main


def _execute(target: Target, main: types.ModuleType) -> None:
    """Run the target's code in ``main`` (this frame is trimmed from tracebacks)."""
    if target.kind == "script":
        code = target.code
        if code is None:  # a syntax error: raise it now, as Python would before running
            assert target.path is not None
            code = compile(target.path.read_bytes(), str(target.path), "exec", dont_inherit=True)
        exec(code, main.__dict__)
    elif target.kind == "main":
        runpy._run_module_as_main("__main__", alter_argv=False)  # type: ignore[attr-defined]
    else:
        runpy._run_module_as_main(target.name, alter_argv=True)  # type: ignore[attr-defined]


def _trimming(hook: Any, main_globals: dict[str, Any], script: Path | None) -> Any:
    """An excepthook that prints the traceback as Python shows it for ``python script.py``:
    from the script's first frame down, without the frames of gradscope's own wrappers
    (``torch.autograd.backward`` is patched; an error inside backward passes through it). A
    syntax error in the script itself has no frame to show: none, as Python prints it. An
    error gradscope raised itself keeps every frame."""

    def excepthook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        t = tb
        while t is not None and t.tb_frame.f_globals is not main_globals:
            t = t.tb_next
        if t is None and not (
            isinstance(value, SyntaxError) and script is not None and value.filename == str(script)
        ):
            t = tb
        t = _without_wrappers(t)
        seen = {id(value)}
        chained = value.__cause__ or value.__context__
        while chained is not None and id(chained) not in seen:  # what the chain prints too
            seen.add(id(chained))
            chained.__traceback__ = _without_wrappers(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        hook(tp, value.with_traceback(t), t)

    return excepthook


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _without_wrappers(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without gradscope's frames, unless the error was raised in gradscope (its last
    frame is ours): then it is gradscope's own, shown whole."""
    frames = []
    t = tb
    while t is not None:
        frames.append(t)
        t = t.tb_next
    if not frames or frames[-1].tb_frame.f_code.co_filename.startswith(_PACKAGE):
        return tb
    kept = [f for f in frames if not f.tb_frame.f_code.co_filename.startswith(_PACKAGE)]
    if len(kept) == len(frames):
        return tb
    out: types.TracebackType | None = None
    for f in reversed(kept):
        out = types.TracebackType(out, f.tb_frame, f.tb_lasti, f.tb_lineno)
    return out


def _on_sigterm(attach: Any, ended: threading.Event) -> Any:
    """Python dies on SIGTERM without running any cleanup; first close the run, then die the
    same way. Not installed when SIGTERM is not at its default (ignored by the parent, or
    handled by someone else)."""
    pid = os.getpid()
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return lambda: None
    except (ValueError, OSError):
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == pid and not ended.is_set():  # not in a forked worker
            ended.set()
            with contextlib.suppress(Exception):
                attach.guard.isolate(
                    EXIT,
                    "signal",
                    attach.guard.call,
                    "signal",
                    attach.close,
                    RunStatus.INTERRUPTED,
                    128 + signal.SIGTERM,
                )
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None

    def restore() -> None:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore
