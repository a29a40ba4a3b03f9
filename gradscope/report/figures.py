"""The report's figures: inline SVG (lines, bars, axes, labels) around PNG pixels (heatmaps).

Every figure is a self-contained string: an ``<svg>`` element whose heatmap pixels are a
base64 PNG in an ``<image href="data:...">``. Nothing is fetched. Text that comes from the run
(layer names: a ``ModuleDict`` key can be anything) is escaped here, because these strings
reach the template as markup. Heatmap pixels are coloured with matplotlib's colormaps (kept
here as tables: matplotlib is not imported) and encoded as its ``imsave`` does, with Pillow; no
figure is built (fast: milliseconds per heatmap).
"""

from __future__ import annotations

import base64
import functools
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


# matplotlib's colormaps as the 8-bit RGB its ``Colormap.__call__(x, bytes=True)`` gives, 256
# entries each (viridis; ColorBrewer's Reds and Oranges), kept here so that writing a report
# does not import matplotlib (about half a second of CPU, most of what a short run's report
# cost). tests/test_fixed_cost.py checks them against matplotlib's.
_LUTS = {
    "viridis": (
        "44015444025544035745055845065a45085b46095c460b5e460c5f460e61470f62471163471265471466"
        "47156747166947186a48196b481a6c481c6e481d6f481e70482071482172482273482374472575472676"
        "472777472878472a79472b7a472c7b462d7c462f7c46307d46317e45327f45347f453580453681443781"
        "443982433a83433b83433c84423d84423e854240854141864142864043874044873f45873f47883e4888"
        "3e49893d4a893d4b893d4c893c4d8a3c4e8a3b508a3b518a3a528b3a538b39548b39558b38568b38578c"
        "37588c37598c365a8c365b8c355c8c355d8c345e8d345f8d33608d33618d32628d32638d31648d31658d"
        "31668d30678d30688d2f698d2f6a8d2e6b8e2e6c8e2e6d8e2d6e8e2d6f8e2c708e2c718e2c728e2b738e"
        "2b748e2a758e2a768e2a778e29788e29798e287a8e287a8e287b8e277c8e277d8e277e8e267f8e26808e"
        "26818e25828e25838d24848d24858d24868d23878d23888d23898d22898d228a8d228b8d218c8d218d8c"
        "218e8c208f8c20908c20918c1f928c1f938b1f948b1f958b1f968b1e978a1e988a1e998a1e998a1e9a89"
        "1e9b891e9c891e9d881e9e881e9f881ea0871fa1871fa2861fa38620a48520a58521a68521a78422a784"
        "23a88323a98224aa8225ab8126ac8127ad8028ae7f29af7f2ab07e2bb17d2cb17d2eb27c2fb37b30b47a"
        "32b57a33b67935b77836b87738b97639b9763bba753dbb743ebc7340bd7242be7144be7045bf6f47c06e"
        "49c16d4bc26c4dc26b4fc36951c46853c56755c66657c66559c7645bc8625ec96160c96062ca5f64cb5d"
        "67cc5c69cc5b6bcd596dce5870ce5672cf5574d05477d05279d1517cd24f7ed24e81d34c83d34b86d449"
        "88d5478bd5468dd64490d64392d74195d73f97d83e9ad83c9dd93a9fd938a2da37a5da35a7db33aadb32"
        "addc30afdc2eb2dd2cb5dd2bb7dd29bade27bdde26bfdf24c2df22c5df21c7e01fcae01ecde01dcfe11c"
        "d2e11bd4e11ad7e219dae218dce218dfe318e1e318e4e318e7e419e9e419ece41aeee51bf1e51cf3e51e"
        "f6e61ff8e621fae622fde724"
    ),
    "Reds": (
        "fff5f0fef4effef3eefef3edfef2ecfef1ebfef1eafef0e9feefe8feefe7feeee6feede5feede4feece3"
        "feebe2feebe1feeae0fee9e0fee9dffee8defee7ddfee7dcfee6dbfee5dafee5d9fee4d8fee3d7fee3d6"
        "fee2d5fee1d4fee1d3fee0d2fddfd1fdded0fdddcefddccdfddbcbfddacafdd8c8fdd7c7fdd6c5fdd5c3"
        "fdd4c2fdd3c0fdd1bffdd0bdfdcfbcfdcebafccdb9fcccb7fccab6fcc9b4fcc8b3fcc7b1fcc6affcc5ae"
        "fcc3acfcc2abfcc1a9fcc0a8fcbfa6fcbea5fcbda3fcbba2fcbaa0fcb99ffcb89dfcb69cfcb59afcb499"
        "fcb297fcb196fcb094fcaf93fcad91fcac90fcab8efca98dfca88bfca78afca689fca487fca386fca284"
        "fca083fc9f81fc9e80fc9d7efc9b7dfc9a7bfc997afc9778fc9677fc9575fc9474fc9272fb9171fb9070"
        "fb8f6ffb8d6dfb8c6cfb8b6bfb8a6afb8868fb8767fb8666fb8464fb8363fb8262fb8161fb7f5ffb7e5e"
        "fb7d5dfb7c5cfb7a5afb7959fb7858fb7757fb7555fb7454fb7353fb7252fb7050fb6f4ffb6e4efb6d4d"
        "fb6b4bfb6a4afa6949fa6748fa6647f96446f96345f86144f86043f85e42f75d42f75b41f75a40f6593f"
        "f6573ef5563df5543cf5533bf4513af45039f44e38f34d37f34b36f24a35f24834f24733f14532f14432"
        "f14231f04130f03f2fef3e2eef3d2def3b2cee3a2bed392bec382aea372ae93529e83429e73328e63228"
        "e53127e43027e32f27e12e26e02d26df2c25de2a25dd2924dc2824db2723d92623d82522d72422d62321"
        "d52221d42120d31f20d21e1fd01d1fcf1c1fce1b1ecd1a1ecc191dcb181dca171cc8171cc7171cc6161c"
        "c5161bc4161bc2161bc1151bc0151abf151abe141abc141abb1419ba1419b91319b81319b71318b51218"
        "b41218b31218b21217b11117af1117ae1117ad1116ac1016ab1016a91016a80f15a70f15a60f15a50f15"
        "a30e14a10e149f0d149d0d149b0c13990c13970b13950b13930a12910a128f09128d09128b08118a0811"
        "8808118607118407108206108006107e05107c050f7a040f78040f76030f74030e72020e70020e6e010e"
        "6c010d6a000d68000d67000c"
    ),
    "Oranges": (
        "fff5ebfef4eafef4e9fef3e8fef3e7fef2e6fef2e5fef1e4fef1e3fef0e2fef0e1feefe0feefe0feeedf"
        "feeedefeedddfeeddcfeeddbfeecdafeecd9feebd8feebd7feead6feead6fee9d5fee9d4fee8d3fee8d2"
        "fee7d1fee7d0fee6cffee6cefde5cdfde5ccfde4cbfde3c9fde3c8fde2c6fde1c5fde1c4fde0c2fddfc1"
        "fddfc0fddebefdddbdfddcbbfddcbafddbb9fddab7fddab6fdd9b4fdd8b3fdd8b2fdd7b0fdd6affdd6ae"
        "fdd5acfdd4abfdd3a9fdd3a8fdd2a7fdd1a5fdd1a4fdd0a3fdcfa1fdce9ffdcd9efdcc9cfdcb9afdca98"
        "fdc997fdc895fdc793fdc692fdc590fdc48efdc28cfdc18bfdc089fdbf87fdbe85fdbd84fdbc82fdbb80"
        "fdba7ffdb97dfdb87bfdb779fdb678fdb576fdb474fdb272fdb171fdb06ffdaf6dfdae6cfdad6afdac68"
        "fdab67fdaa66fda964fda863fda761fda660fda55efda45dfda35bfda25afda158fda057fd9f55fd9e54"
        "fd9d52fd9c51fd9a4ffd994efd984cfd974bfd964afd9548fd9447fd9345fd9244fd9142fd9041fd8f3f"
        "fd8e3efd8d3cfc8c3bfc8b3afc8a38fb8937fb8736fa8634fa8533fa8432f98331f9822ff9812ef8802d"
        "f87e2bf77d2af77c29f77b28f67a26f67925f67824f57622f57521f47420f4731ff4721df3711cf3701b"
        "f36f19f26d18f26c17f16b16f16a14f16913f06812ef6712ef6611ee6510ed6410ec630fec620feb610e"
        "ea600ee95f0de95d0de85c0ce75b0be65a0be5590ae5580ae45709e35609e25508e25407e15307e05206"
        "df5106df5005de4f05dd4e04dc4d03dc4c03db4b02da4a02d94901d94801d74701d64701d44601d34501"
        "d14501cf4401ce4401cc4301cb4301c94201c74101c64101c44001c34001c13f01bf3f01be3e02bc3d02"
        "bb3d02b93c02b73c02b63b02b43b02b33a02b13a02af3902ae3802ac3802ab3702a93702a73602a63602"
        "a43503a33503a23403a13403a033039e33039d32039c32039b3103993103983003973003962f03952f03"
        "932f03922e03912e03902d038e2d038d2c038c2c038b2b038a2b03882a03872a03862903852903832803"
        "8228038127038027037f2704"
    ),
}


@functools.cache
def _lut(cmap: str) -> np.ndarray:
    """The colormap ``cmap`` as ``[N, 3]`` uint8 (another name than those of ``_LUTS``: from
    matplotlib)."""
    hexed = _LUTS.get(cmap)
    if hexed is not None:
        return np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8).reshape(-1, 3)
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    lut = (cm(np.arange(cm.N))[:, :3] * 255).astype(np.uint8)
    lut.flags.writeable = False  # shared by every call (cached)
    return lut


def png_data_uri(rgb: np.ndarray) -> str:
    """An ``[H, W, 3|4]`` float image (0-1) as a ``data:image/png;base64,...`` URI: the PNG
    that matplotlib's ``imsave`` writes (8-bit RGBA, 100 dpi, Pillow's encoder), without its
    "Software" text chunk. Pillow is matplotlib's own dependency."""
    from PIL import Image

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype.kind != "f":
        raise ValueError(f"expected an [H, W, 3|4] float image, got {img.dtype} {img.shape}")
    h, w, channels = img.shape
    rgba = np.empty((h, w, 4), dtype=img.dtype)
    rgba[..., :channels] = img
    if channels == 3:
        rgba[..., 3] = 1
    rgba[np.isnan(img).any(axis=2)] = 0
    if rgba.max(initial=0) > 1 or rgba.min(initial=0) < 0:
        raise ValueError("image values must be in the [0, 1] range")
    data = np.ascontiguousarray((rgba * 255).astype(np.uint8))
    buf = io.BytesIO()
    Image.frombuffer("RGBA", (w, h), data, "raw", "RGBA", 0, 1).save(
        buf, format="png", dpi=(100, 100)
    )
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorize(
    values: np.ndarray, bad: np.ndarray | None, cmap: str, vmin: float, vmax: float
) -> np.ndarray:
    """``values`` in ``cmap`` between ``vmin`` and ``vmax``, as floats (0-1) ``[..., 3]``:
    each value takes the colormap entry matplotlib gives it (``x * N``, truncated; the top of
    the range takes the last); grey where NaN, magenta where ``bad``."""
    lut = _lut(cmap)
    n = len(lut)
    span = vmax - vmin if vmax > vmin else 1.0
    idx = np.nan_to_num(np.clip((values - vmin) / span, 0.0, 1.0)) * n
    idx[idx == n] = n - 1
    rgb: np.ndarray = lut[idx.astype(int)] / 255.0
    rgb[np.isnan(values)] = NAN_RGB
    if bad is not None:
        rgb[bad] = BAD_RGB
    return rgb


def heat_range(
    values: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> tuple[float, float]:
    """The values a heatmap's colormap ends stand for: ``vmin`` and ``vmax``, or where None,
    the finite values' extremes (an empty or flat range widened to one unit)."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax or 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


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
    lo, hi = heat_range(values, vmin, vmax)
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
