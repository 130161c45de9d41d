"""Loss and accuracy curves as a PNG, drawn with Pillow (no matplotlib needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mvcompile.onnx_io import atomic_write_bytes

Series = dict[str, list[tuple[float, float]]]  # label -> [(x, y)]
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
PANEL = (480, 320)
MARGIN = (56, 30, 16, 40)  # left, top, right, bottom


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(title: str, series: Series, xlabel: str) -> Image.Image:
    img = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], PANEL[0] - MARGIN[2], PANEL[1] - MARGIN[3]
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline="black")
    for ty in _ticks(y0, y1):
        _, py = at(x0, ty)
        draw.line((left, py, right, py), fill=(225, 225, 225))
        draw.text((4, py - 6), f"{ty:.3g}", fill="black", font=font)
    for tx in _ticks(x0, x1):
        px, _ = at(tx, y0)
        draw.text((px - 6, bottom + 4), f"{tx:g}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text(((left + right) / 2 - 15, bottom + 22), xlabel, fill="black", font=font)
    for k, (label, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy[-1:] if len(xy) > 1 else xy:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        ly = top + 12 + 14 * k
        draw.line((right - 130, ly, right - 112, ly), fill=color, width=2)
        draw.text((right - 106, ly - 6), label, fill=color, font=font)
    return img


def write_curves(path: Path, history: list[dict]) -> None:
    """Two panels: train/val loss and val accuracy per epoch."""
    def series(key: str) -> list[tuple[float, float]]:
        return [(row["epoch"], row[key]) for row in history
                if row.get(key) is not None and math.isfinite(row[key])]
    loss = {"train loss": series("train_loss"), "val loss": series("val_loss")}
    acc = {"val accuracy": series("val_acc")}
    if any(row.get("ema_val_acc") is not None for row in history):
        acc["EMA val accuracy"] = series("ema_val_acc")
    canvas = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    canvas.paste(_panel("loss", loss, "epoch"), (0, 0))
    canvas.paste(_panel("validation top-1 accuracy", acc, "epoch"), (PANEL[0], 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
