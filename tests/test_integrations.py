"""Lightning and Hugging Face Trainer callbacks: a tiny model through each framework, its run
directory read back and checked against what the framework itself measured."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import gradscope


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x, x.sum(1, keepdim=True) * 3.0


def _events(run_dir: Any) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _framework(module: str) -> Any:
    """``module``, or a skip where it is not installed. The frameworks' import-time warnings
    (deprecations of their own dependencies: pkg_resources, multipart, ... with older releases)
    are not gradscope's: they are silenced here, once, before gradscope's integration imports
    the framework (then already imported) under the suite's warnings-as-errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(
            module, reason=f"{module} is not installed (pip install -e '.[test]' installs it)"
        )


# -- Lightning -----------------------------------------------------------------------------------


def _lightning() -> Any:
    return _framework("lightning.pytorch")


def _fit(tmp_path: Any, callbacks: list[Any], ckpt_path: str | None = None, **trainer: Any) -> Any:
    pl = _lightning()
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Lit()
    x, y = _data()
    # (the frameworks' own notes - few dataloader workers, deprecations - are silenced around
    # fit/train by the callers: they are not gradscope's)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    options = dict(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
    )
    t = pl.Trainer(callbacks=callbacks, **{**options, **trainer})
    t.fit(model, loader, ckpt_path=ckpt_path)
    return t, model


def _norm_oracle() -> Any:
    pl = _lightning()

    class Oracle(pl.Callback):  # type: ignore[misc, name-defined]
        """Lightning's own hook: after unscaling, before its clipping."""

        def __init__(self) -> None:
            self.norms: list[dict[str, float]] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.norms.append(
                {
                    n: torch.linalg.vector_norm(p.grad).item()
                    for n, p in pl_module.named_parameters()
                }
            )

    return Oracle()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_steps_and_norms_are_lightnings(tmp_path, accumulate):
    _lightning()
    from gradscope.integrations.lightning import GradscopeCallback

    oracle = _norm_oracle()
    cb = GradscopeCallback(
        out=str(tmp_path / "runs"), name="pl", activation_every=1, quiet=True, report=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = _fit(
            tmp_path, [cb, oracle], accumulate_grad_batches=accumulate, gradient_clip_val=0.5
        )
    run = gradscope.load_run(cb.scope.run_dir)
    assert run.meta["status"] == "completed"
    assert run.meta["steps"] == trainer.global_step == 6 == len(oracle.norms)
    assert run.meta["models"] == {"": "Lit"}
    norms = run.wide("grad_norm")
    for step, expected in enumerate(oracle.norms):
        for name, value in expected.items():
            assert norms.loc[step, name] == pytest.approx(value, rel=1e-5), (step, name)
    # the clip (0.5) acted on these norms: they are the ones before it; after it, at most 0.5
    total = run.wide("grad_norm_total")["(run)"]
    clipped = run.wide("grad_norm_total_clipped")["(run)"]
    assert total.max() > 0.5
    assert clipped.tolist() == pytest.approx(total.clip(upper=0.5).tolist(), rel=1e-5)
    framework = [e for e in _events(cb.scope.run_dir) if e["event"] == "framework"]
    assert framework[0]["name"] == "lightning"
    assert framework[0]["gradient_clip_val"] == 0.5
    assert framework[0]["accumulate_grad_batches"] == accumulate
    assert "before Lightning's gradient clipping" in framework[0]["note"]
    assert set(run.wide("act_dead_fraction").columns) == {"net.1"}


def test_lightning_weights_are_bit_identical_without_a_remedy(tmp_path):
    _lightning()
    from gradscope.integrations.lightning import GradscopeCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = _fit(tmp_path / "a", [])
        cb = GradscopeCallback(out=str(tmp_path / "runs"), quiet=True, report=False)
        _, watched = _fit(tmp_path / "b", [cb])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert cb.scope.closed


def test_lightning_exception_closes_the_run_as_failed(tmp_path):
    pl = _lightning()
    from gradscope.integrations.lightning import GradscopeCallback

    class Boom(pl.Callback):  # type: ignore[misc, name-defined]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    cb = GradscopeCallback(out=str(tmp_path / "runs"), name="pl", quiet=True, report=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        _fit(tmp_path, [cb, Boom()])
    meta = json.loads((cb.scope.run_dir / "run.json").read_text())
    assert meta["status"] == "failed" and meta["steps"] == 3
    assert (cb.scope.run_dir / "findings.json").exists()


def test_lightning_remedy_state_travels_in_its_checkpoint(tmp_path):
    _lightning()
    from gradscope.integrations.lightning import GradscopeCallback

    cb = GradscopeCallback(out=str(tmp_path / "runs"), clip="autoclip", quiet=True, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = _fit(tmp_path, [cb])
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    [state] = [v for k, v in saved.items() if "GradscopeCallback" in k]
    norms = state["remedies"]["clippers"][0]["sorted"]
    assert torch.isfinite(norms).sum() == 6  # AutoClip's history of the 6 steps

    again = GradscopeCallback(out=str(tmp_path / "runs"), clip="autoclip", quiet=True, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path / "resumed", [again], max_steps=9, ckpt_path=str(tmp_path / "last.ckpt"))
    resumed = again.state_dict()["remedies"]["clippers"][0]["sorted"]
    assert torch.isfinite(resumed).sum() == 9  # restored by Lightning, then 3 more steps
    assert again.scope.closed and again.scope.steps == 3


@pytest.mark.slow
def test_lightning_ddp_strategy_writes_one_combined_run(tmp_path):
    """Lightning's own DDP (2 CPU processes): every rank watches, rank 0 writes one run."""
    _lightning()
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(here / "workers" / "lightning_ddp.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 steps 6" in proc.stdout and "rank 1 steps 6" in proc.stdout
    assert proc.stderr.count("run completed") == 1  # rank 0's summary only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pl"]
    meta = json.loads((tmp_path / "pl" / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 6
    assert meta["distributed"]["combined"] is True


def test_a_bad_option_fails_when_the_callback_is_made():
    _lightning()
    from gradscope.integrations.lightning import GradscopeCallback

    with pytest.raises(ValueError, match="zclp"):
        GradscopeCallback(clip="zclp")


# -- Hugging Face --------------------------------------------------------------------------------


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.net(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


def _transformers() -> Any:
    _framework("accelerate")  # the Trainer needs it
    return _framework("transformers")


def _train_hf(tmp_path: Any, callbacks: list[Any], **args: Any) -> tuple[Any, list[dict]]:
    transformers = _transformers()
    x, y = _data()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    logged: list[dict] = []

    class Logs(transformers.TrainerCallback):  # type: ignore[misc, name-defined]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "grad_norm" in logs:
                logged.append({"step": state.global_step, **logs})

    options = dict(
        output_dir=str(tmp_path / "hf"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.5,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targs = transformers.TrainingArguments(**{**options, **args})
        trainer = transformers.Trainer(
            model=_Regressor(), args=targs, train_dataset=dataset, callbacks=[*callbacks, Logs()]
        )
        trainer.train()
    return trainer, logged


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_steps_and_norms_are_the_trainers(tmp_path, accumulate):
    _transformers()
    from gradscope.integrations.hf import GradscopeCallback

    cb = GradscopeCallback(
        out=str(tmp_path / "runs"), name="hf", activation_every=1, quiet=True, report=False
    )
    trainer, logged = _train_hf(tmp_path, [cb], gradient_accumulation_steps=accumulate)
    run = gradscope.load_run(cb.scope.run_dir)
    assert run.meta["status"] == "completed"
    assert run.meta["steps"] == trainer.state.global_step == 6
    total = run.wide("grad_norm_total")["(run)"]
    # the Trainer logs the norm before its max_grad_norm clip: so does gradscope
    assert [total.loc[e["step"] - 1] for e in logged] == pytest.approx(
        [e["grad_norm"] for e in logged], rel=1e-4
    )
    clipped = run.wide("grad_norm_total_clipped")["(run)"]
    assert (clipped <= 0.5 + 1e-5).all() and (total > 0.5).any()
    framework = [e for e in _events(cb.scope.run_dir) if e["event"] == "framework"]
    assert framework[0]["name"] == "transformers" and framework[0]["max_grad_norm"] == 0.5
    assert framework[0]["gradient_accumulation_steps"] == accumulate
    assert set(run.wide("act_dead_fraction").columns) == {"net.1"}


def test_hf_a_bad_option_fails_when_the_callback_is_made():
    _transformers()
    from gradscope.integrations.hf import GradscopeCallback

    with pytest.raises(TypeError, match="activation_evry"):
        GradscopeCallback(activation_evry=3)
