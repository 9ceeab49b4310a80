"""A small line chart as PNG (no plotting dependency): eval and tune's metrics against alpha.

Drawn on a numpy RGB canvas with a built-in 5x7 upper-case bitmap font and written with the
PNG encoder ``describe.png_bytes`` uses for the lock heatmap.
"""

from __future__ import annotations

import numpy as np

from .describe import png_bytes

# 5x7 glyphs, one string of 7 rows per character; '#' is ink.
_GLYPHS = {
    "A": " ### #   ##   #######   ##   ##   #", "B": "#### #   ##   ##### #   ##   ##### ",
    "C": " ### #   ##    #    #    #   # ### ", "D": "#### #   ##   ##   ##   ##   ##### ",
    "E": "######    #    #### #    #    #####", "F": "######    #    #### #    #    #    ",
    "G": " ### #   ##    # ####   ##   # ####", "H": "#   ##   ##   #######   ##   ##   #",
    "I": " ###   #    #    #    #    #   ### ", "J": "  ###    #    #    #    ##   # ### ",
    "K": "#   ##  # # #  ##   # #  #  # #   #", "L": "#    #    #    #    #    #    #####",
    "M": "#   ### ### # ##   ##   ##   ##   #", "N": "#   ###  ## # ##  ###   ##   ##   #",
    "O": " ### #   ##   ##   ##   ##   # ### ", "P": "#### #   ##   ##### #    #    #    ",
    "Q": " ### #   ##   ##   ## # ##  #  ## #", "R": "#### #   ##   ##### # #  #  # #   #",
    "S": " ####    #     ###     #    #####  ", "T": "#####  #    #    #    #    #    #  ",
    "U": "#   ##   ##   ##   ##   ##   # ### ", "V": "#   ##   ##   ##   ##   # # #   #  ",
    "W": "#   ##   ##   ## # ## # ## # # # # ", "X": "#   ##   # # #   #   # # #   ##   #",
    "Y": "#   ##   # # #   #    #    #    #  ", "Z": "#####    #   #   #   #   #    #####",
    "0": " ### #   ##  ### # ###  ##   # ### ", "1": "  #   ##    #    #    #    #   ### ",
    "2": " ### #   #    #   #   #   #   #####", "3": "#####   #   #     #     ##   # ### ",
    "4": "   #   ##  # # #  ######   #    #  ", "5": "######    ####     #    ##   # ### ",
    "6": "  ##  #   #    #### #   ##   # ### ", "7": "#####    #   #   #    #    #    #  ",
    "8": " ### #   ##   # ### #   ##   # ### ", "9": " ### #   ##   # ####    #   #  ##  ",
    ".": "                         ##   ##   ", "-": "               ###               ".ljust(35),
    ":": "      ##   ##        ##   ##       ", "=": "          #####     #####          ",
    "%": "##   ##  #   #   #   #   #  ##   ##", "(": "   #   #   #    #    #     #     # ",
    ")": " #     #     #    #    #   #   #   ", "/": "    #    #   #   #   #   #    #    ",
    " ": " " * 35,
}
WHITE, BLACK, GREY = (255, 255, 255), (30, 30, 30), (215, 215, 215)
COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


class Canvas:
    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def text(self, x: int, y: int, text: str, colour=BLACK, scale: int = 1) -> None:
        for i, ch in enumerate(text.upper()):
            glyph = _GLYPHS.get(ch, _GLYPHS[" "]).ljust(35)
            for row in range(7):
                for col in range(5):
                    if glyph[row * 5 + col] == "#":
                        self.rect(x + (i * 6 + col) * scale, y + row * scale, scale, scale, colour)

    def rect(self, x: int, y: int, w: int, h: int, colour) -> None:
        height, width, _ = self.pixels.shape
        x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = colour

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0.0, 1.0, steps):
            self.rect(int(round(x0 + (x1 - x0) * t)) - width // 2, int(round(y0 + (y1 - y0) * t)) - width // 2,
                      width, width, colour)


def line_chart(panels: list[dict], x_label: str, title: str, panel_size=(380, 260)) -> bytes:
    """``panels``: [{"title", "x": [...], "series": {name: [y or None, ...]}, "y_max": float or None}]."""
    pw, ph = panel_size
    margin_left, margin_top, margin_bottom, legend_w = 48, 40, 44, 170
    canvas = Canvas(len(panels) * (pw + margin_left + legend_w) + 20, ph + margin_top + margin_bottom + 10)
    canvas.text(10, 8, title, scale=2)
    for p, panel in enumerate(panels):
        left = 10 + p * (pw + margin_left + legend_w) + margin_left
        top = margin_top
        xs = np.array(panel["x"], dtype=float)
        values = [v for ys in panel["series"].values() for v in ys if v is not None]
        y_max = panel.get("y_max") or (max(values) * 1.1 if values and max(values) > 0 else 1.0)
        x_min, x_max = float(xs.min()), float(xs.max())
        x_span = (x_max - x_min) or 1.0

        def to_px(x, y):
            return left + (x - x_min) / x_span * pw, top + ph - min(max(y, 0.0), y_max) / y_max * ph

        for k in range(5):  # horizontal grid and y ticks
            y = y_max * k / 4
            _, py = to_px(x_min, y)
            canvas.rect(left, int(py), pw, 1, GREY)
            canvas.text(left - 44, int(py) - 3, f"{y:.2f}"[:6])
        for x in xs:
            px, _ = to_px(x, 0)
            canvas.rect(int(px), top + ph, 1, 4, BLACK)
            canvas.text(int(px) - 8, top + ph + 8, f"{x:g}"[:5])
        canvas.rect(left, top, 1, ph, BLACK)
        canvas.rect(left, top + ph, pw, 1, BLACK)
        canvas.text(left + pw // 2 - 3 * len(x_label), top + ph + 24, x_label)
        canvas.text(left, top - 12, panel["title"])
        for s, (name, ys) in enumerate(panel["series"].items()):
            colour = COLOURS[s % len(COLOURS)]
            points = [to_px(x, y) for x, y in zip(xs, ys) if y is not None]
            for (ax, ay), (bx, by) in zip(points, points[1:]):
                canvas.line(ax, ay, bx, by, colour)
            for px, py in points:
                canvas.rect(int(px) - 3, int(py) - 3, 7, 7, colour)
            canvas.rect(left + pw + 14, top + 10 + s * 16, 10, 10, colour)
            canvas.text(left + pw + 28, top + 12 + s * 16, name[:24])
    return png_bytes(canvas.pixels)
