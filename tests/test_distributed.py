"""Several processes: DDP, FSDP1 (flat and use_orig_params) and FSDP2 on 2 CPU ranks (gloo).

The workers start once per module (tests/workers/dist_checks.py under torchrun) and run every
scenario; each one is compared here with the single-process reference (the same network
trained on the union of the ranks' batches, measured with torch's own functions) within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradscope import distributed
from gradscope.cli import without_nproc

HERE = Path(__file__).parent


def _has_fsdp2() -> bool:
    """FSDP2 (``fully_shard``): torch >= 2.4."""
    for where in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            if hasattr(__import__(where, fromlist=["fully_shard"]), "fully_shard"):
                return True
        except ImportError:
            continue
    return False


HAS_FSDP2 = torch.distributed.is_available() and _has_fsdp2()
SCENARIOS = ("ddp", "fsdp1_orig", "fsdp1_flat", *(("fsdp2",) if HAS_FSDP2 else ()))
needs_fsdp2 = pytest.mark.skipif(not HAS_FSDP2, reason="FSDP2 (fully_shard) needs torch >= 2.4")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"  # torch's own deprecation notes on FSDP1, in the workers
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("dist")
    which = ",".join(
        [
            *SCENARIOS,
            "nonfinite",
            *(("fsdp2_remedies",) if HAS_FSDP2 else ()),
            "internal_error",
            "destroyed",
        ]
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(HERE / "workers" / "dist_checks.py"),
            str(out),
            which,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    for name in which.split(","):
        assert "error" not in res[name], res[name]["error"]
    return res, out


@pytest.mark.parametrize("kind", SCENARIOS)
def test_records_equal_the_single_process_reference(results, kind):
    res, _ = results
    ref, got = res["reference"], res[kind]["got"]
    assert len(ref) > 150
    missing = sorted(set(ref) - set(got))
    assert not missing, missing[:10]
    wrong = {
        k: (got[k], v) for k, v in ref.items() if got[k] != pytest.approx(v, rel=1e-5, abs=1e-7)
    }
    assert not wrong, list(wrong.items())[:10]


@pytest.mark.parametrize("kind", SCENARIOS)
def test_one_run_directory_written_by_rank_0(results, kind):
    res, out = results
    r = res[kind]
    assert [p.name for p in (out / kind).iterdir()] == ["run"]  # rank 1 wrote nothing
    assert {"run.json", "findings.json", "events.jsonl", "metrics", "tb", "report.html"} <= set(
        r["files"]
    )
    meta = r["meta"]
    assert meta["world_size"] == 2 and meta["status"] == "completed"
    assert meta["distributed"]["combined"] is True
    assert meta["distributed"]["sharded_params"] == (0 if kind == "ddp" else 6)


@pytest.mark.parametrize("kind", SCENARIOS)
def test_names_and_shapes_are_the_unwrapped_models(results, kind):
    meta = results[0][kind]["meta"]
    params = {d["name"]: d["shape"] for d in meta["layers"] if d["kind"] == "param"}
    assert params == {
        "0.weight": [16, 6],
        "0.bias": [16],
        "2.weight": [8, 16],
        "2.bias": [8],
        "4.weight": [1, 8],
        "4.bias": [1],
    }
    assert meta["models"] == {"": "Sequential"}
    sites = meta["sites"]
    assert "1" in sites and "3" in sites and not any("fsdp" in s for s in sites)


def test_a_unit_is_dead_only_if_dead_on_every_rank(results):
    """Unit 0 is dead on both ranks' batches, unit 1 only on rank 0's: 1 of 16 is dead."""
    res, _ = results
    for kind in SCENARIOS:
        got = res[kind]["got"]
        assert got["act_dead_fraction|1|0"] == pytest.approx(1 / 16), kind


def test_a_nonfinite_value_on_rank_1_is_reported_with_its_rank(results):
    res, _ = results
    findings = res["nonfinite"]["findings"]
    [f] = [f for f in findings if f["kind"] == "nonfinite"]
    assert f["first_step"] == 3
    # rank 1 replayed its flagged step: the module that overflowed, named on that step
    assert (f["phase"], f["class"], f["evidence"]["attributed"]) == ("forward", "Blow", "replayed")
    assert "on rank 1" in f["message"]
    assert f["evidence"]["ranks"]["1"] == {"step": 3, "in": "loss"}
    # rank 0 saw it only in its gradients, which DDP averaged with rank 1's
    assert f["evidence"]["ranks"]["0"]["in"] == "gradients"
    assert {e["rank"] for e in res["nonfinite"]["traced"]} <= {0, 1}


@needs_fsdp2
def test_fsdp2_clip_and_guard_act_on_the_global_gradient(results):
    """Clipping by the norm over all shards, and the guard skipping a NaN step that only rank
    1's batch had, on every rank: the weights are the single-process run's (clip_grad_norm_,
    step 3 left out)."""
    r = results[0]["fsdp2_remedies"]
    assert r["max_diff"] < 1e-6
    assert r["skipped"] == [3]
    assert r["clipped_total"] == [pytest.approx(0.05, rel=1e-5)] * 5


@needs_fsdp2
def test_remedies_that_cannot_act_alike_on_every_rank_are_refused_in_one_line(results):
    first, second, agc = results[0]["fsdp2_remedies"]["refusals"]
    assert first.startswith("clip='norm:") and "FSDP1" in first and "\n" not in first
    assert second.startswith("clip='zclip") and "fully_shard" in second
    assert agc.startswith("clip='agc") and "AGC is not supported on sharded" in agc


def test_an_internal_error_on_rank_1_leaves_no_rank_waiting(results):
    """The workers finished (the fixture would time out otherwise): rank 1 went on taking part
    in the flushes after its error, and rank 0 wrote the error with its rank."""
    r = results[0]["internal_error"]
    [err] = r["errors"]
    assert err["rank"] == 1 and "injected" in err["error"]
    assert r["meta"]["status"] == "completed" and r["meta"]["steps"] == 8
    assert r["meta"]["distributed"]["combined"] is True
    assert r["grad_steps"] == list(range(8))  # DDP's replicated gradients: rank 0's


def test_destroy_process_group_before_close_still_combines(results):
    res, _ = results
    r = res["destroyed"]
    assert r["dead"] == [pytest.approx(1 / 16)] * 3  # combined: rank 0 alone would say 2/16
    assert r["meta"]["world_size"] == 2
    assert r["meta"]["distributed"]["stopped"] == "the process group was destroyed"


def test_gradscope_run_nproc_per_node(tmp_path):
    """``gradscope run --nproc-per-node 2`` starts torchrun; the unchanged script runs on both
    ranks; one run directory, one summary."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--nproc-per-node",
            "2",
            "--out",
            str(tmp_path),
            "--name",
            "r",
            "--activation-every",
            "1",
            "--no-report",
            str(HERE / "scripts" / "ddp_train.py"),
            "0.0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 loss" in proc.stdout and "rank 1 loss" in proc.stdout
    assert proc.stderr.count("run completed") == 1, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 5
    import gradscope

    dead = gradscope.load_run(tmp_path / "r").wide("act_dead_fraction")["1"]
    # unit 0 is dead on rank 1's batches only: never counted
    assert (dead < 1 / 8 + 1e-9).all()


def test_nproc_per_node_bad_value_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--nproc-per-node",
            "two",
            str(HERE / "scripts" / "ddp_train.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gradscope run: error: --nproc-per-node 'two': expected a positive number of "
        "processes, or auto, cpu or gpu (as torchrun accepts)"
    ]


def test_worker_arguments_drop_only_nproc():
    assert without_nproc(
        ["--nproc-per-node", "2", "--clip", "zclip", "t.py", "--nproc-per-node", "9"]
    ) == ["--clip", "zclip", "t.py", "--nproc-per-node", "9"]
    assert without_nproc(["--nproc-per-node=4", "-m", "pkg.train"]) == ["-m", "pkg.train"]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("_fsdp_wrapped_module.0._fsdp_wrapped_module.weight", "0.weight"),
        ("_orig_mod.encoder._checkpoint_wrapped_module.fc", "encoder.fc"),
        ("fc.weight", "fc.weight"),
        ("_fsdp_wrapped_module", ""),
    ],
)
def test_wrapper_components_leave_names(raw, clean):
    assert distributed.clean_name(raw) == clean


def test_single_process_is_not_distributed():
    assert distributed.world() is None
    assert distributed.Reducer.create() is None
