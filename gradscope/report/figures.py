"""The report's figures: inline SVG (lines, bars, axes, labels) around PNG pixels (heatmaps).

Every figure is a self-contained string: an ``<svg>`` element whose heatmap pixels are a
base64 PNG in an ``<image href="data:...">``. Nothing is fetched. Text that comes from the run
(layer names: a ``ModuleDict`` key can be anything) is escaped here, because these strings
reach the template as markup. Heatmap pixels are coloured with matplotlib's colormaps and
encoded by its PNG writer; no figure is built (fast: milliseconds per heatmap).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from markupsafe import Markup, escape

NAN_RGB = (0.88, 0.88, 0.88)  # no data in the cell
BAD_RGB = (0.85, 0.0, 0.55)  # NaN/Inf seen in the cell
BAD_COLOR = "rgb(217,0,140)"  # the same, for SVG strokes and fills
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks between lo and hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out = []
    t = first
    while t <= hi + 1e-9 * step:
        out.append(round(t, 12))
        t += step
    return out


def png_data_uri(rgb: np.ndarray) -> str:
    """An ``[H, W, 3|4]`` float image (0-1) as a ``data:image/png;base64,...`` URI."""
    from matplotlib import image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, np.ascontiguousarray(rgb), format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorize(
    values: np.ndarray, bad: np.ndarray | None, cmap: str, vmin: float, vmax: float
) -> np.ndarray:
    import matplotlib

    span = vmax - vmin if vmax > vmin else 1.0
    norm = np.clip((values - vmin) / span, 0.0, 1.0)
    rgb = matplotlib.colormaps[cmap](np.nan_to_num(norm))[..., :3]
    rgb[np.isnan(values)] = NAN_RGB
    if bad is not None:
        rgb[bad] = BAD_RGB
    return rgb


def heatmap(
    values: np.ndarray,
    bad: np.ndarray | None,
    rows: Sequence[str],
    steps: np.ndarray,
    width: int,
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "",
    title: str = "",
) -> Markup:
    """Rows (layers, forward order, top to bottom) x step bins, coloured by value, with
    NaN/Inf cells marked; axes, every k-th row label, and a colour bar."""
    r = values.shape[0]
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax or 1.0)
    if hi <= lo:
        hi = lo + 1.0
    uri = png_data_uri(colorize(values, bad, cmap, lo, hi))
    label_w = min(260, 12 + 6.5 * max((len(n) for n in rows), default=4))
    plot_w, plot_h = 640.0, float(min(560, max(120, 14 * r)))
    left, top = label_w + 8, 24
    total_w, total_h = left + plot_w + 90, top + plot_h + 40
    out = [
        _open(total_w, total_h, title),
        f'<image x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
        f'preserveAspectRatio="none" style="image-rendering:pixelated" href="{uri}"/>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#444"/>',
    ]
    every = max(1, math.ceil(r / (plot_h / 12)))
    for i in range(0, r, every):
        y = top + (i + 0.5) * plot_h / r
        out.append(
            f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end">'
            f"{escape(_clip(rows[i]))}</text>"
        )
    last = int(steps[-1]) + width - 1 if len(steps) else 0
    for t in _ticks(0, max(last, 1)):
        x = left + plot_w * (t / max(last + 1, 1))
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" '
            f'y2="{top + plot_h + 4}" stroke="#444"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{int(t)}</text>"
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{total_h - 4}" text-anchor="middle">step'
        f"{f' (bins of {width})' if width > 1 else ''}</text>"
    )
    # colour bar
    bar = np.linspace(hi, lo, 64).reshape(64, 1)
    bar_uri = png_data_uri(colorize(bar, None, cmap, lo, hi))
    bx = left + plot_w + 14
    out.append(
        f'<image x="{bx}" y="{top}" width="12" height="{plot_h}" '
        f'preserveAspectRatio="none" href="{bar_uri}"/>'
        f'<text x="{bx + 16}" y="{top + 8}">{escape(_fmt(hi))}</text>'
        f'<text x="{bx + 16}" y="{top + plot_h}">{escape(_fmt(lo))}</text>'
        f'<text x="{bx}" y="{top - 8}">{escape(label)}</text>'
    )
    if bad is not None and bad.any():
        out.append(
            f'<rect x="{bx}" y="{top + plot_h + 8}" width="12" height="10" '
            f'fill="{BAD_COLOR}"/><text x="{bx + 16}" y="{top + plot_h + 17}">'
            "NaN/Inf</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def _open(width: float, height: float, title: str) -> str:
    """The opening of a figure: a scalable SVG with its accessible title."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="fig" role="img" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'height="{height:.0f}" {FONT}><title>{escape(title)}</title>'
    )


def _clip(name: str, n: int = 38) -> str:
    return name if len(name) <= n else name[: n // 2 - 1] + "…" + name[-(n // 2 - 1) :]


def line_chart(
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    log_y: bool = False,
    x_max: float | None = None,
    y_label: str = "",
    title: str = "",
    markers: Sequence[tuple[float, str]] = (),
    bad_x: Sequence[float] = (),
) -> Markup:
    """Lines of (name, x, y); log-scaled y on request (non-positive values dropped); vertical
    markers (remedy actions) and magenta ticks (``class="nonfinite"``, with a legend entry)
    at ``bad_x``, where a value was NaN/Inf."""
    w, h, left, top, right, bottom = 640.0, 240.0, 64.0, 16.0, 180.0, 34.0
    pts = []
    for name, x, y in series:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if log_y else True)
        yy = np.log10(y[keep]) if log_y else y[keep]
        pts.append((name, x[keep], yy))
    xs = np.concatenate([p[1] for p in pts]) if pts else np.empty(0)
    ys = np.concatenate([p[2] for p in pts]) if pts else np.empty(0)
    x0 = 0.0
    x1 = float(x_max if x_max is not None else (xs.max() if xs.size else 1.0))
    x1 = max(x1, x0 + 1)
    y0, y1 = (float(ys.min()), float(ys.max())) if ys.size else (0.0, 1.0)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + w * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        return top + h * (1 - (y - y0) / (y1 - y0))

    tw, th = left + w + right, top + h + bottom
    out = [
        _open(tw, th, title),
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>',
    ]
    for t in _ticks(y0, y1):
        lab = _fmt(10**t) if log_y else _fmt(t)
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'stroke="#ddd"/><text x="{left - 4}" y="{py(t) + 3.5:.1f}" '
            f'text-anchor="end">{escape(lab)}</text>'
        )
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{top + h + 14}" text-anchor="middle">{int(t)}</text>')
    out.append(
        f'<text x="{left + w / 2}" y="{th - 4}" text-anchor="middle">step</text>'
        f'<text x="12" y="{top + h / 2}" transform="rotate(-90 12 {top + h / 2})" '
        f'text-anchor="middle">{escape(y_label)}{" (log)" if log_y else ""}</text>'
    )
    for mx, text in markers:
        out.append(
            f'<line x1="{px(mx):.1f}" x2="{px(mx):.1f}" y1="{top}" y2="{top + h}" '
            f'stroke="#9467bd" stroke-dasharray="4 3"><title>{escape(text)}</title>'
            "</line>"
        )
    for bxv in bad_x:
        out.append(
            f'<line class="nonfinite" x1="{px(bxv):.1f}" x2="{px(bxv):.1f}" '
            f'y1="{top + h - 8}" y2="{top + h}" stroke="{BAD_COLOR}" stroke-width="2">'
            f"<title>NaN/Inf at step {int(bxv)}</title></line>"
        )
    for i, (name, x, y) in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        if len(x) == 1:
            out.append(f'<circle cx="{px(x[0]):.1f}" cy="{py(y[0]):.1f}" r="2.5" fill="{color}"/>')
        elif len(x):
            path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.4" '
                f'points="{path}"><title>{escape(name)}</title></polyline>'
            )
        ly = top + 12 + 14 * i
        if ly < top + h:
            out.append(
                f'<rect x="{left + w + 10}" y="{ly - 8}" width="10" height="3" '
                f'fill="{color}"/><text x="{left + w + 24}" y="{ly - 3}">'
                f"{escape(_clip(name, 26))}</text>"
            )
    if len(bad_x):
        ly = min(top + 12 + 14 * len(pts), top + h)
        out.append(
            f'<rect x="{left + w + 14}" y="{ly - 10}" width="2" height="8" '
            f'fill="{BAD_COLOR}"/><text x="{left + w + 24}" y="{ly - 3}">'
            "NaN/Inf</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(
    names: Sequence[str],
    mean: np.ndarray,
    peak: np.ndarray,
    *,
    title: str = "",
    label: str = "",
    nonfinite: np.ndarray | None = None,
) -> Markup:
    """Horizontal bars per layer (forward order): the mean (dark) and the maximum (light) of
    the finite values, log scale; a layer with NaN/Inf values (``nonfinite``: how many per
    layer) gets a magenta mark saying how many, so no NaN reads as a short bar."""
    n = len(names)
    row_h, left, w = 14.0, min(260.0, 12 + 6.5 * max((len(x) for x in names), default=4)), 420.0
    top = 20.0
    th = top + n * row_h + 30
    vals = np.concatenate(
        [mean[np.isfinite(mean) & (mean > 0)], peak[np.isfinite(peak) & (peak > 0)]]
    )
    lo = math.floor(math.log10(vals.min())) if vals.size else -1
    hi = math.ceil(math.log10(vals.max())) if vals.size else 0
    hi = max(hi, lo + 1)

    def bx(v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            return 0.0
        return w * (math.log10(v) - lo) / (hi - lo)

    tw = left + w + 150
    out = [_open(tw, th, title)]
    for e in range(lo, hi + 1):
        x = left + bx(10.0**e)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + n * row_h}" '
            f'stroke="#ddd"/><text x="{x:.1f}" y="{top - 6}" text-anchor="middle">'
            f"1e{e}</text>"
        )
    for i, name in enumerate(names):
        y = top + i * row_h
        out.append(
            f'<text x="{left - 4}" y="{y + 10:.1f}" text-anchor="end">'
            f"{escape(_clip(name))}</text>"
            f'<rect x="{left}" y="{y + 2:.1f}" width="{bx(float(peak[i])):.1f}" '
            f'height="{row_h - 4}" fill="#aec7e8"><title>max {escape(_fmt(peak[i]))}'
            f"</title></rect>"
            f'<rect x="{left}" y="{y + 4:.1f}" width="{bx(float(mean[i])):.1f}" '
            f'height="{row_h - 8}" fill="#1f77b4"><title>mean {escape(_fmt(mean[i]))}'
            f"</title></rect>"
        )
        bad = int(nonfinite[i]) if nonfinite is not None else 0
        if bad:
            x = left + max(bx(float(peak[i])), bx(float(mean[i]))) + 4
            out.append(
                f'<rect class="nonfinite" x="{x:.1f}" y="{y + 2:.1f}" width="8" '
                f'height="{row_h - 4}" fill="{BAD_COLOR}"><title>{bad} NaN/Inf '
                f'value(s)</title></rect><text x="{x + 11:.1f}" y="{y + 10:.1f}" '
                f'fill="{BAD_COLOR}">NaN/Inf ×{bad}</text>'
            )
        elif not (math.isfinite(float(mean[i])) or math.isfinite(float(peak[i]))):
            out.append(f'<text x="{left + 4}" y="{y + 10:.1f}" fill="#888">not recorded</text>')
    out.append(
        f'<text x="{left}" y="{th - 6}">{escape(label)}: mean (dark), max (light), '
        "log scale</text></svg>"
    )
    return Markup("".join(out))


def paired_bars(
    names: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    labels: tuple[str, str],
    *,
    log: bool = True,
    title: str = "",
    unit: str = "",
    bad_a: np.ndarray | None = None,
    bad_b: np.ndarray | None = None,
) -> Markup:
    """Two bars per layer (forward order): run A above run B, on one scale (log10 for norms,
    linear for fractions). A layer missing from one run has no bar there and says "not
    recorded"; one with NaN/Inf values there (``bad_a``, ``bad_b``) gets a magenta mark
    (a NaN value has no bar: it never reads as 0)."""
    n = len(names)
    row_h, w = 20.0, 420.0
    left = min(260.0, 12 + 6.5 * max((len(x) for x in names), default=4))
    top = 24.0
    th = top + n * row_h + 30
    both = np.concatenate([a, b])
    ok = np.isfinite(both) & ((both > 0) if log else True)
    lo: float
    hi: float
    if log:
        lo = math.floor(math.log10(both[ok].min())) if ok.any() else -1
        hi = max(math.ceil(math.log10(both[ok].max())) if ok.any() else 0, lo + 1)
    else:
        lo, hi = 0.0, max(1.0, float(both[ok].max()) if ok.any() else 1.0)

    def bx(v: float) -> float:
        if not math.isfinite(v) or (log and v <= 0):
            return 0.0
        pos = (math.log10(v) - lo) / (hi - lo) if log else (v - lo) / (hi - lo)
        return w * min(max(pos, 0.0), 1.0)

    tw = left + w + 160
    out = [_open(tw, th, title)]
    ticks = [10.0**e for e in range(int(lo), int(hi) + 1)] if log else _ticks(lo, hi)
    for t in ticks:
        x = left + bx(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + n * row_h}" '
            f'stroke="#ddd"/><text x="{x:.1f}" y="{top - 6}" text-anchor="middle">'
            f"{escape(_fmt(t))}</text>"
        )
    any_bad = False
    for i, name in enumerate(names):
        y = top + i * row_h
        out.append(
            f'<text x="{left - 4}" y="{y + 13:.1f}" text-anchor="end">{escape(_clip(name))}</text>'
        )
        for j, (vals, bad, color) in enumerate(((a, bad_a, PALETTE[0]), (b, bad_b, PALETTE[1]))):
            v = float(vals[i])
            yy = y + 2 + 8 * j
            out.append(
                f'<rect x="{left}" y="{yy:.1f}" width="{bx(v):.1f}" '
                f'height="7" fill="{color}"><title>{escape(labels[j])}: '
                f"{escape(_fmt(v))}{escape(unit)}</title></rect>"
            )
            if bad is not None and bad[i]:
                any_bad = True
                x = left + bx(v) + 3
                out.append(
                    f'<rect class="nonfinite" x="{x:.1f}" y="{yy:.1f}" width="7" '
                    f'height="7" fill="{BAD_COLOR}"><title>{escape(labels[j])}: '
                    f"NaN/Inf values ({escape(_fmt(v))})</title></rect>"
                )
            elif not math.isfinite(v):
                out.append(
                    f'<text x="{left + 3}" y="{yy + 6.5:.1f}" font-size="8" '
                    f'fill="#888">{escape(labels[j])}: not recorded</text>'
                )
    for j, color in enumerate(PALETTE[:2]):
        out.append(
            f'<rect x="{left + w + 10}" y="{top + 14 * j}" width="10" height="8" '
            f'fill="{color}"/><text x="{left + w + 24}" y="{top + 8 + 14 * j}">'
            f"{escape(_clip(labels[j], 16))}</text>"
        )
    if any_bad:
        out.append(
            f'<rect x="{left + w + 10}" y="{top + 28}" width="10" height="8" '
            f'fill="{BAD_COLOR}"/><text x="{left + w + 24}" y="{top + 36}">'
            "NaN/Inf</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))
