"""Scoring the findings of the corpus against the labels.

Only ``warning`` and ``error`` findings count. Per kind K on a split:

- a run *planted* with K is detected (TP) when it got a finding of any kind in its label's
  ``primary`` set (K alone, or any of exploding/nonfinite/update_ratio_high for a divergence);
  otherwise it is a miss (FN);
- FP: a run that got a finding of K although K is neither its planted kind, nor in its
  ``primary`` set, nor in ``also_ok`` (healthy runs included); counted once per run;
- layer accuracy (over TPs): some detecting finding names an acceptable layer; lenient: its
  ``also_layers`` count too;
- delay (over TPs): the earliest detecting finding's ``first_step`` minus the onset.

Pathological runs whose label was not confirmed by outcome are left out (listed); runs with no
outcome recorded (``--no-outcomes``) are kept.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .families import HEALTHY, KINDS, RUN

COUNTED = ("warning", "error")
SPLITS = ("heldout", "calibration")


def layer_ok(layer: str, accepted: list[str]) -> bool:
    for a in accepted:
        if a == "*":
            if layer != RUN:
                return True
        elif layer == a or layer.startswith(a + ".") or layer.startswith(a + "#"):
            return True
    return False


def counted(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in run["findings"] if f["severity"] in COUNTED]


def detecting(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The counted findings of a primary kind that last to the onset or beyond (a finding
    that ended before the cause acted did not detect it)."""
    lab = run["label"]
    return [
        f for f in counted(run) if f["kind"] in lab["primary"] and f["last_step"] >= lab["onset"]
    ]


def excluded(run: dict[str, Any], outcomes: dict[str, Any]) -> bool:
    if run["label"]["kind"] == HEALTHY:
        return False
    o = outcomes.get(run["id"])
    return o is not None and not o.get("confirmed")


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def score_split(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        tp = fn = fp = layer_hits = lenient_hits = ideal = 0
        delays: list[int] = []
        for r in runs:
            lab = r["label"]
            found = counted(r)
            kinds = {f["kind"] for f in found}
            if lab["kind"] == kind:
                hits = detecting(r)
                if hits:
                    tp += 1
                    ideal += kind in kinds
                    if any(layer_ok(f["layer"], lab["layers"]) for f in hits):
                        layer_hits += 1
                    if any(
                        layer_ok(x, lab["layers"])
                        for f in hits
                        for x in [f["layer"], *f["also_layers"]]
                    ):
                        lenient_hits += 1
                    delays.append(max(0, min(f["first_step"] for f in hits) - lab["onset"]))
                else:
                    fn += 1
            elif kind in kinds and kind not in lab["primary"] and kind not in lab["also_ok"]:
                fp += 1
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall
            else (0.0 if tp + fn and precision is not None else None)
        )
        per[kind] = {
            "planted": tp + fn,
            "tp": tp,
            "fn": fn,
            "fp": fp,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "ideal_kind_found": ideal,
            "layer_acc": _ratio(layer_hits, tp),
            "layer_acc_lenient": _ratio(lenient_hits, tp),
            "delay_median": statistics.median(delays) if delays else None,
            "delay_max": max(delays) if delays else None,
        }
    healthy = [r for r in runs if r["label"]["kind"] == HEALTHY]
    alarms = [len(counted(r)) for r in healthy]
    return {
        "kinds": per,
        "runs": len(runs),
        "families": len({r["family"] for r in runs}),
        "healthy_runs": len(healthy),
        "false_alarms_per_healthy_run": _ratio(sum(alarms), len(healthy)),
        "healthy_runs_with_alarm": sum(1 for a in alarms if a),
        "healthy_alarm_kinds": dict(
            Counter(f["kind"] for r in healthy for f in counted(r)).most_common()
        ),
        "confusion": confusion(runs),
    }


def confusion(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """rows: planted kind; columns: kinds found (a run counts once in each), or ``nothing``."""
    m: dict[str, dict[str, int]] = {}
    for r in runs:
        row = m.setdefault(r["label"]["kind"], defaultdict(int))
        kinds = {f["kind"] for f in counted(r)}
        for k in kinds or {"nothing"}:
            row[k] += 1
    return {k: dict(v) for k, v in m.items()}


def misses(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        lab = r["label"]
        found = counted(r)
        summary = [f"{f['kind']}@{f['layer']}:{f['first_step']}" for f in found]
        if lab["kind"] != HEALTHY and not detecting(r):
            out.append(
                {
                    "id": r["id"],
                    "split": r["split"],
                    "type": "miss",
                    "planted": lab["kind"],
                    "found": summary,
                    "note": lab["note"],
                }
            )
        elif lab["kind"] != HEALTHY:
            hits = detecting(r)
            if not any(layer_ok(f["layer"], lab["layers"]) for f in hits):
                out.append(
                    {
                        "id": r["id"],
                        "split": r["split"],
                        "type": "wrong_layer",
                        "planted": lab["kind"],
                        "found": summary,
                        "accepted": lab["layers"],
                    }
                )
        spurious = [
            f
            for f in found
            if f["kind"] not in lab["primary"]
            and f["kind"] not in lab["also_ok"]
            and f["kind"] != lab["kind"]
        ]
        for f in spurious:
            out.append(
                {
                    "id": r["id"],
                    "split": r["split"],
                    "type": "false_alarm",
                    "planted": lab["kind"],
                    "found": f"{f['kind']}@{f['layer']}:{f['first_step']}",
                }
            )
    return out


def family_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family: runs scored, detected, and what the missed runs got instead (most common)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["family"]].append(r)
    out = []
    for name, rs in groups.items():
        lab = rs[0]["label"]
        if lab["kind"] == HEALTHY:
            alarms = Counter(f["kind"] for r in rs for f in counted(r))
            out.append(
                {
                    "family": name,
                    "split": rs[0]["split"],
                    "planted": HEALTHY,
                    "runs": len(rs),
                    "detected": None,
                    "instead": dict(alarms.most_common(3)),
                }
            )
            continue
        missed = [r for r in rs if not detecting(r)]
        instead = Counter(f["kind"] for r in missed for f in counted(r)) or Counter(
            {"nothing": len(missed)}
        )
        out.append(
            {
                "family": name,
                "split": rs[0]["split"],
                "planted": lab["kind"],
                "runs": len(rs),
                "detected": len(rs) - len(missed),
                "instead": dict(instead.most_common(3)) if missed else {},
            }
        )
    return sorted(out, key=lambda x: (x["split"], x["planted"], x["family"]))


def option_group(option: str) -> str:
    """``clip='norm:1.08e+10'`` -> ``clip='norm:X'``: one row per remedy, not per value."""
    return re.sub(r"norm:[0-9.e+-]+", "norm:X", option)


def cure_table(cures: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for c in cures:
        key = (option_group(c["option"]), labels.get(c["id"], "?"))
        rows[key][0] += 1
        rows[key][1] += bool(c["cured"])
    return [
        {"option": o, "planted": k, "suggested": n, "cured": m, "rate": m / n}
        for (o, k), (n, m) in sorted(rows.items())
    ]


def report(
    results: list[dict[str, Any]], outcomes: dict[str, Any], cures: list[dict[str, Any]]
) -> dict[str, Any]:
    kept = [r for r in results if not excluded(r, outcomes)]
    dropped = [r["id"] for r in results if excluded(r, outcomes)]
    patho = [r for r in results if r["label"]["kind"] != HEALTHY]
    confirmed = sum(1 for r in patho if (outcomes.get(r["id"]) or {}).get("confirmed"))
    by_family: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in patho:
        by_family[r["family"]][0] += 1
        by_family[r["family"]][1] += bool((outcomes.get(r["id"]) or {}).get("confirmed"))
    labels = {r["id"]: r["label"]["kind"] for r in results}
    return {
        "corpus": {
            s: {
                "runs": sum(r["split"] == s for r in results),
                "families": len({r["family"] for r in results if r["split"] == s}),
                "scored": sum(r["split"] == s for r in kept),
            }
            for s in SPLITS
        },
        "pathological": len(patho),
        "confirmed": confirmed,
        "confirmed_by_family": {
            k: {"variants": v[0], "confirmed": v[1]} for k, v in by_family.items()
        },
        "unconfirmed": dropped,
        "splits": {s: score_split([r for r in kept if r["split"] == s]) for s in SPLITS},
        "misses": misses(kept),
        "families": family_summary(kept),
        "cures": cure_table(cures, labels),
    }


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.0f}%"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown(rep: dict[str, Any]) -> str:
    lines = []
    c = rep["corpus"]
    lines.append(
        "Corpus: "
        + "; ".join(
            f"{s}: {c[s]['runs']} runs in {c[s]['families']} families ({c[s]['scored']} scored)"
            for s in SPLITS
        )
        + f". Pathological variants confirmed by outcome: {rep['confirmed']}/{rep['pathological']}."
    )
    for s in SPLITS:
        sp = rep["splits"][s]
        lines += [
            "",
            f"**{s}** ({sp['runs']} runs, {sp['families']} families; ideal kind found: of the "
            "detected runs, those where the planted kind itself was found, not only another "
            "kind of its primary set)",
            "",
            "| kind | planted | TP | FN | FP | precision | recall | F1 | ideal kind found "
            "| layer acc. (lenient) | delay median / max |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for k, v in sp["kinds"].items():
            lines.append(
                f"| {k} | {v['planted']} | {v['tp']} | {v['fn']} | {v['fp']} | "
                f"{_f(v['precision'])} | {_f(v['recall'])} | {_f(v['f1'])} | "
                f"{v['ideal_kind_found']}/{v['tp']} | "
                f"{_f(v['layer_acc'], True)} ({_f(v['layer_acc_lenient'], True)}) | "
                f"{_f(v['delay_median'])} / {_f(v['delay_max'])} |"
            )
        alarm_kinds = ", ".join(f"{k} {n}" for k, n in sp["healthy_alarm_kinds"].items())
        lines += [
            "",
            f"Healthy runs: {sp['healthy_runs']}; false alarms per healthy run "
            f"{_f(sp['false_alarms_per_healthy_run'])}; healthy runs with any warning: "
            f"{sp['healthy_runs_with_alarm']} ({alarm_kinds or 'none'}).",
        ]
    lines += [
        "",
        "**Per family** (detected: a finding of a primary kind at or after the onset; for "
        "healthy families, the warnings raised)",
        "",
        "| family | split | planted | scored | detected | what the misses got (runs) |",
        "|---|---|---|--:|--:|---|",
    ]
    for fr in rep["families"]:
        inst = ", ".join(f"{k} {n}" for k, n in fr["instead"].items()) or "-"
        lines.append(
            f"| `{fr['family']}` | {fr['split']} | {fr['planted']} | {fr['runs']} | "
            f"{_f(fr['detected'])} | {inst} |"
        )
    if rep["cures"]:
        lines += [
            "",
            "**Cure rate of suggested options** (rerun with exactly that option; cured: final "
            "loss within the rescue margin of the healthy sibling, finite)",
            "",
            "| option | planted | suggested | cured | rate |",
            "|---|---|--:|--:|--:|",
        ]
        for row in rep["cures"]:
            lines.append(
                f"| `{row['option']}` | {row['planted']} | {row['suggested']} | {row['cured']} "
                f"| {_f(row['rate'], True)} |"
            )
    return "\n".join(lines) + "\n"


def confusion_figure(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [HEALTHY, *KINDS]
    cols = [*KINDS, "nothing"]
    short = {k: k.replace("_gradients", "").replace("update_ratio", "ur") for k in rows + cols}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, s in zip(axes, SPLITS, strict=True):
        m = rep["splits"][s]["confusion"]
        a = np.array([[m.get(r, {}).get(c, 0) for c in cols] for r in rows], dtype=float)
        ax.imshow(a / np.maximum(a.max(), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if a[i, j]:
                    dark = a[i, j] > 0.6 * a.max()
                    ax.text(
                        j,
                        i,
                        int(a[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(cols)), [short[c] for c in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [short[r] for r in rows])
        ax.set_xlabel("kinds found (warning/error; a run counts once in each)")
        ax.set_ylabel("planted")
        ax.set_title(f"{s}: {rep['splits'][s]['runs']} runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
