"""Pictures of a train_toy.py run, drawn from plain numbers: one self-contained HTML page and the
same figures as standalone SVG files, written into the run's folder.

No plotting library: an SVG is text, and a PNG (the camera images, embedded in the SVGs) is a few
lines of zlib and struct. Every figure is a function from data to an SVG string:
- keep_grid:  camera images with, per LFP layer, the dropped patches faded and the named block's
              patches outlined (the held-out scenes; the one scene with its instruction swapped);
- curves:     action loss and held-out nearest / success over the steps, per mode;
- per_layer:  tokens processed, the named block's kept share against chance, FLOPs per layer.
"""

from __future__ import annotations

import base64
import html
import os
import struct
import zlib

import numpy as np

MODE_COLOURS = {"dense": "#1f77b4", "lfp": "#d62728"}


# %% PNG =======================================================================================

def png(rgb) -> bytes:
    """rgb [H, W, 3] uint8 -> the bytes of a PNG file (8-bit RGB, no interlace, filter 0)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))   # each row: filter type 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)            # 8 bits, RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def cameras_png(images, scale: int) -> bytes:
    """images [3 cams, 3 rgb, H, W] floats in [0, 1] -> one PNG of the cameras stacked top to
    bottom, each pixel a scale x scale square (sharp in any viewer, no smoothing to switch off)."""
    # In float32, as torch computes the scene: its value x 255 rounds the same way here.
    rgb = np.asarray(images, dtype=np.float32).clip(0, 1) * np.float32(255)
    rgb = rgb.round().astype(np.uint8)
    rgb = np.concatenate(list(rgb.transpose(0, 2, 3, 1)), axis=0)     # [3 H, W, 3]
    return png(rgb.repeat(scale, axis=0).repeat(scale, axis=1))


# %% SVG pieces ================================================================================

def svg(width: float, height: float, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def text(x, y, s, anchor="start", extra="", size=12):
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-family="sans-serif" '
            f'font-size="{size}" {extra}>{html.escape(str(s))}</text>')


def polyline(points, colour, dash=""):
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dashed}/>'


def axes(x0, y0, w, h, title, y_ticks, x_ticks):
    """A frame with its title and tick labels; ticks are (position in px, label)."""
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
           text(x0 + w / 2, y0 - 8, title, "middle", 'font-weight="bold"')]
    for y, label in y_ticks:
        out += [f'<line x1="{x0}" x2="{x0 + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>',
                text(x0 - 4, y + 4, label, "end")]
    out += [text(x, y0 + h + 14, label, "middle") for x, label in x_ticks]
    return out


# %% Figures ===================================================================================

def keep_map_text(group: dict) -> str:
    """The terminal's keep map of one group (see keep_grid): per LFP layer, per camera, '#' kept,
    '.' dropped, brackets around the named block's patches."""
    cams, side = group["named"].shape[:2]
    views = ("top (x-y)", "front (x-z)", "side (y-z)")[:cams]
    lines = [f'keep maps for {group["label"]}:  # kept  . dropped  [ ] the named block\'s patches',
             "        " + "".join(f"{name:<{3 * side + 2}}" for name in views)]
    for layer, kept in sorted(group["kept"].items()):
        for row in range(side):
            cells = ["".join(("[{}]" if group["named"][cam, row, col] else " {} ").format(
                "#" if kept[cam, row, col] else ".") for col in range(side)) for cam in range(cams)]
            label = f"layer {layer}" if row == 0 else ""
            lines.append(f"{label:<8}" + "  ".join(cells))
        lines.append("")
    return "\n".join(lines)


def keep_grid(title: str, groups: list[dict], scale: int = 2) -> str:
    """One block of cells per group: the cameras stacked top to bottom, first as they are, then
    per LFP layer with the dropped patches faded. A group is dict(label, images [3, 3, H, W],
    named [3, S, S] bool (the named block's patches), kept {layer: [3, S, S] bool},
    shares {layer: (named block's kept share, other blocks')})."""
    cams, side = groups[0]["named"].shape[:2]
    cell = groups[0]["images"].shape[-1] * scale                      # one camera, px
    patch, gap, left = cell // side, 10, 48
    layers = sorted(groups[0]["kept"])
    width = left + (1 + len(layers)) * (cell + gap)
    block = 56 + cams * cell + 20                                     # one group's height
    body = [f'<defs><rect id="fade" width="{patch:g}" height="{patch:g}" fill="white" '
            f'fill-opacity="0.78"/><rect id="named" x="0.75" y="0.75" width="{patch - 1.5:g}" '
            f'height="{patch - 1.5:g}" fill="none" stroke="#ff00ff" stroke-width="1.5"/></defs>',
            text(8, 18, title, extra='font-weight="bold"', size=14)]
    for g, group in enumerate(groups):
        top = 30 + g * block
        uri = base64.b64encode(cameras_png(group["images"], scale)).decode()
        body.append(f'<g class="instruction" data-label="{html.escape(group["label"])}">')
        body.append(text(8, top + 14, group["label"], extra='font-weight="bold"'))
        for c, name in enumerate(("top", "front", "side")[:cams]):
            body.append(text(left - 4, top + 40 + c * cell + cell / 2, name, "end"))
        for col, layer in enumerate([None] + layers):
            x, y = left + col * (cell + gap), top + 40
            body.append(f'<image x="{x}" y="{y}" width="{cell}" height="{cams * cell}" '
                        f'xlink:href="data:image/png;base64,{uri}"/>')
            if layer is None:
                body.append(text(x + cell / 2, y - 4, "scene", "middle"))
            else:
                named_share, other_share = group["shares"][layer]
                body.append(text(x + cell / 2, y - 4, f"layer {layer}", "middle"))
                body.append(text(x + cell / 2, y + cams * cell + 14,
                                 f"{named_share:.0%} / {other_share:.0%}", "middle"))
            for c, r, q in np.ndindex(cams, side, side):   # patch (camera, row, column)
                px, py = x + q * patch, y + c * cell + r * patch
                if layer is not None and not group["kept"][layer][c, r, q]:
                    body.append(f'<use xlink:href="#fade" x="{px:g}" y="{py:g}"/>')
                if group["named"][c, r, q]:
                    body.append(f'<use xlink:href="#named" x="{px:g}" y="{py:g}"/>')
        body.append("</g>")
    note = ("faded: dropped by that layer's router; magenta: the named block's patches; "
            "under each layer: the named block's kept share / the other blocks'")
    body.append(text(8, 30 + len(groups) * block, note, extra='fill="#555"'))
    return svg(width, 40 + len(groups) * block, body)


def curves(runs: dict) -> str:
    """runs {mode: dict(loss=[(step, action loss)], held_out=[(step, nearest, success)])}:
    the action loss (log scale) and the held-out nearest (dotted) and success (solid)."""
    w, h, x0, y0, gap = 360, 220, 60, 40, 90
    steps = [s for r in runs.values() for s, *_ in r["loss"] + r["held_out"]] or [1]
    last = max(steps)

    def x_of(step, left):
        return left + w * step / last
    x_ticks = [(round(last * f), str(round(last * f))) for f in (0, 0.5, 1)]
    losses = [v for r in runs.values() for _, v in r["loss"] if v > 0] or [1.0]
    lo, hi = np.log10(min(losses)), np.log10(max(losses)) + 1e-9

    def y_loss(v):
        return y0 + h * (1 - (np.log10(max(v, 10 ** lo)) - lo) / (hi - lo))
    body = axes(x0, y0, w, h, "action loss (L1, log scale)",
                [(y_loss(10 ** e), f"{10 ** e:.3g}") for e in np.linspace(lo, hi, 4)],
                [(x_of(s, x0), t) for s, t in x_ticks])
    right = x0 + w + gap
    body += axes(right, y0, w, h, "held-out: success (solid), nearest (dotted)",
                 [(y0 + h * (1 - f), f"{f:.0%}") for f in (0, 0.25, 0.5, 0.75, 1)],
                 [(x_of(s, right), t) for s, t in x_ticks])
    for i, (mode, r) in enumerate(runs.items()):
        colour = MODE_COLOURS.get(mode, "#333")
        if r["loss"]:
            body.append(polyline([(x_of(s, x0), y_loss(v)) for s, v in r["loss"]], colour))
        for k, dash in ((1, "2,3"), (2, "")):
            points = [(x_of(s[0], right), y0 + h * (1 - s[k])) for s in r["held_out"]]
            if points:
                body.append(polyline(points, colour, dash))
        body.append(f'<rect x="{x0 + 90 * i}" y="{y0 + h + 28}" width="12" height="12" '
                    f'fill="{colour}"/>')
        body.append(text(x0 + 90 * i + 16, y0 + h + 38, mode))
    body.append(text(x0 + w / 2, y0 + h + 60, "step", "middle"))
    return svg(right + w + 20, y0 + h + 70, body)


def bars(x0, y0, w, h, title, layers, series, top, label):
    """Grouped bars: series [(name, colour, {layer: value})], values from 0 to top."""
    body = axes(x0, y0, w, h, title, [(y0 + h * (1 - f), label(top * f)) for f in (0, 0.5, 1)],
                [(x0 + w * (i + 0.5) / len(layers), str(l)) for i, l in enumerate(layers)])
    slot = w / len(layers)
    bar = slot * 0.8 / len(series)
    for i, layer in enumerate(layers):
        for j, (name, colour, values) in enumerate(series):
            if layer in values:
                v = values[layer] / top
                body.append(f'<rect class="bar" data-series="{html.escape(name)}" '
                            f'data-layer="{layer}" x="{x0 + i * slot + slot * 0.1 + j * bar:.1f}" '
                            f'y="{y0 + h * (1 - v):.1f}" width="{bar:.1f}" height="{h * v:.1f}" '
                            f'fill="{colour}"/>')
    for j, (name, colour, _) in enumerate(series):
        body += [f'<rect x="{x0 + 130 * j}" y="{y0 + h + 22}" width="12" height="12" '
                 f'fill="{colour}"/>', text(x0 + 130 * j + 16, y0 + h + 32, name)]
    return body


def per_layer(n_tokens: int, tokens: dict, flops: dict, kept: dict) -> str:
    """tokens and flops {series: {layer: value}} (dense and each run), kept {series: {layer:
    share}} (the named block's and other blocks' kept shares, and chance)."""
    layers = sorted({l for v in list(tokens.values()) + list(flops.values()) for l in v})
    w, h, x0, y0, gap = 300, 160, 60, 40, 80
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f"]

    def series(d):
        return [(name, palette[i % len(palette)], v) for i, (name, v) in enumerate(d.items())]
    top_flops = max(v for s in flops.values() for v in s.values())
    body = bars(x0, y0, w, h, "tokens processed per layer", layers, series(tokens), n_tokens,
                lambda v: f"{v:.0f}")
    body += bars(x0 + w + gap, y0, w, h, "GFLOP per layer (forward)", layers, series(flops),
                 top_flops, lambda v: f"{v / 1e9:.2g}")
    if kept:
        body += bars(x0 + 2 * (w + gap), y0, w, h, "kept share per LFP layer", layers,
                     series(kept), 1.0, lambda v: f"{v:.0%}")
    return svg(x0 + 3 * (w + gap), y0 + h + 50, body)


# %% The page ==================================================================================

def write(folder: str, title: str, figures: dict, lines: list[str]) -> str:
    """figures {name: svg text} -> folder/NAME.svg each, and folder/report.html with all of them
    inline after the lines of text; each file written to a temporary name first and renamed, so a
    browser refreshing mid-run never reads half a file. Returns the page's path."""
    os.makedirs(folder, exist_ok=True)

    def put(name, content):
        tmp = os.path.join(folder, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, os.path.join(folder, name))
    for name, figure in figures.items():
        put(f"{name}.svg", figure)
    sections = "\n".join(f'<h2>{html.escape(name.replace("_", " "))}</h2>\n<div>{figure}</div>'
                         for name, figure in figures.items())
    paragraphs = "\n".join(f"<p>{html.escape(line)}</p>" for line in lines)
    put("report.html", f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
        f'{html.escape(title)}</title></head>\n<body style="font-family: sans-serif">\n<h1>'
        f'{html.escape(title)}</h1>\n{paragraphs}\n{sections}\n</body></html>\n')
    return os.path.join(folder, "report.html")
