"""Pictures, drawn by matplotlib (the optional extra ``pip install 'weightlock[plot]'``).

- ``eval_curves``: eval and tune's metrics against alpha (harmful compliance, over-refusal, QA accuracy,
  degenerate answers, with their 95% Wilson intervals as error bars; KL on its own axis), with the alpha tune
  chose marked, and a row of per-category panels for each set whose items have categories;
- ``lock_heatmap``: a lock's layer x head map of held-out probe accuracy with a colour bar, the kept heads
  marked.

PNG or SVG, chosen by the output file's suffix. matplotlib's object API (``Figure``) is used, not pyplot:
no global state and no display backend, so it works in pipelines and threads.
"""

from __future__ import annotations

import io
from pathlib import Path

from weightlock.errors import InvalidInputError, MissingDependencyError

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 120
# Bounded by the lock schema (4096 x 4096 heads); the figure stops growing long before that.
MAX_FIGURE_INCHES = 24


def image_format(path: str | Path) -> str:
    """ "png" or "svg" from the file name; anything else is refused before any work is done."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InvalidInputError(
            f"cannot tell the picture format of {Path(path).name}", hint="name the file .png or .svg"
        )
    return fmt


def check_can_draw(path: str | Path) -> str:
    """Before long work whose result will be drawn: the format from the suffix, and matplotlib importable."""
    fmt = image_format(path)
    _figure(1, 1)
    return fmt


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("drawing plots needs matplotlib", hint="pip install 'weightlock[plot]'") from None
    return Figure(figsize=(min(width, MAX_FIGURE_INCHES), min(height, MAX_FIGURE_INCHES)), layout="constrained")


def _encode(figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=DPI, metadata={"Software": "weightlock"} if fmt == "png" else None)
    return buffer.getvalue()


RATE_SERIES = (  # metric, label, colour, marker
    ("harmful_compliance", "harmful compliance", "tab:red", "o"),
    ("over_refusal", "over-refusal", "tab:blue", "s"),
    ("degenerate", "degenerate answers", "tab:gray", "^"),
    ("qa_accuracy", "QA accuracy", "tab:green", "D"),
)
MAX_CATEGORY_LINES = 12  # per panel: more would be a legend, not a plot (the report has them all)


def _rate_points(xs, entries):
    """(x, rate, below, above) for each measured entry: the error bar's reach under and over the rate."""
    return [
        (x, e["rate"], e["rate"] - e["low"], e["high"] - e["rate"])
        for x, e in zip(xs, entries, strict=True)
        if e is not None
    ]


def _draw_rates(axis, points, **style):
    if points:
        axis.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[[p[2] for p in points], [p[3] for p in points]],
            capsize=3,
            **style,
        )


def _entry(result, name):
    """The rate with its interval from ``result.rates``, or its value alone (a result built by hand)."""
    entry = result.rates.get(name) if getattr(result, "rates", None) else None
    value = getattr(result, name)
    if entry is None and value is not None:
        entry = {"rate": value, "low": value, "high": value}
    return entry


def eval_curves(results, title: str, fmt: str = "png", chosen_alpha: float | None = None) -> bytes:
    """Rates (error bars: their 95% Wilson intervals) and KL against alpha, one line per metric; results
    without an alpha are drawn at 0. Below, for each set with categories, its rate per category."""
    from matplotlib.ticker import PercentFormatter

    rows = sorted(results, key=lambda r: 0.0 if r.alpha is None else r.alpha)
    xs = [0.0 if r.alpha is None else r.alpha for r in rows]
    categorised = [
        (name, label)
        for name, label, _, _ in RATE_SERIES
        if name != "degenerate" and any("by_category" in (getattr(r, "rates", {}).get(name) or {}) for r in rows)
    ]
    figure = _figure(11, 4.2 * (2 if categorised else 1))
    grid = figure.subplots(2 if categorised else 1, max(2, len(categorised)), squeeze=False)
    rates_axis, kl_axis = grid[0][0], grid[0][1]
    for extra in grid[0][2:]:
        extra.set_axis_off()
    for name, label, colour, marker in RATE_SERIES:
        entries = [_entry(r, name) for r in rows]
        if name == "qa_accuracy" and all(e is None for e in entries):
            continue
        _draw_rates(rates_axis, _rate_points(xs, entries), marker=marker, color=colour, label=label)
    rates_axis.set(title="rates (bars: 95% intervals)", xlabel="alpha", ylim=(-0.03, 1.03))
    rates_axis.yaxis.set_major_formatter(PercentFormatter(1.0))
    kl_points = [(x, r.kl) for x, r in zip(xs, rows, strict=True) if r.kl is not None]
    if kl_points:
        kl_axis.plot(
            [p[0] for p in kl_points],
            [p[1] for p in kl_points],
            marker="o",
            color="tab:purple",
            label="KL(unlocked || locked)",
        )
    else:
        kl_axis.text(0.5, 0.5, "no KL measured", ha="center", va="center", transform=kl_axis.transAxes)
    kl_axis.set(title="drift on benign text", xlabel="alpha", ylabel="nats / token")
    axes = [rates_axis, kl_axis]
    for column, (name, label) in enumerate(categorised):
        axis = grid[1][column]
        axes.append(axis)
        names = sorted({c for r in rows for c in ((r.rates.get(name) or {}).get("by_category") or {})})
        for category in names[:MAX_CATEGORY_LINES]:
            entries = [((r.rates.get(name) or {}).get("by_category") or {}).get(category) for r in rows]
            _draw_rates(axis, _rate_points(xs, entries), marker=".", label=category[:40])
        shown = f" (first {MAX_CATEGORY_LINES} of {len(names)})" if len(names) > MAX_CATEGORY_LINES else ""
        axis.set(title=f"{label} by category{shown}", xlabel="alpha", ylim=(-0.03, 1.03))
        axis.yaxis.set_major_formatter(PercentFormatter(1.0))
    for extra in grid[1][len(categorised) :] if categorised else ():
        extra.set_axis_off()
    for axis in axes:
        axis.grid(alpha=0.3)
        if chosen_alpha is not None:
            axis.axvline(
                chosen_alpha, color="black", linestyle="--", linewidth=1, label=f"chosen alpha {chosen_alpha:g}"
            )
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="x-small" if axis not in (rates_axis, kl_axis) else "small")
    figure.suptitle(title)
    return _encode(figure, fmt)


def lock_heatmap(lock, fmt: str = "png") -> bytes:
    """Held-out probe accuracy per (layer, head) with a colour bar; the lock's heads outlined. A lock without
    accuracies (imported from SafetyLock, say) shows its kept heads only."""
    import numpy as np

    from weightlock.core.describe import probe_accuracy_grid

    src = lock.source_model
    layers, heads = src.num_hidden_layers, src.num_attention_heads
    figure = _figure(max(6.0, 2.5 + heads * 0.22), max(3.5, 1.5 + layers * 0.16))
    axis = figure.subplots()
    grid = probe_accuracy_grid(lock)
    if grid is not None:
        image = axis.imshow(
            grid, cmap="viridis", vmin=min(0.5, float(grid.min())), vmax=1.0, aspect="auto", interpolation="nearest"
        )
        figure.colorbar(image, ax=axis, label="held-out probe accuracy")
    else:
        kept = np.zeros((layers, heads))
        kept[lock.layers, lock.heads] = 1.0
        axis.imshow(kept, cmap="Greys", vmin=0, vmax=1.5, aspect="auto", interpolation="nearest")
    # a square outline about the size of a cell (points), so that kept heads stand out at any grid size
    width, height = (min(MAX_FIGURE_INCHES, size) for size in figure.get_size_inches())
    cell = min(72 * 0.8 * width / heads, 72 * 0.8 * height / layers)
    axis.scatter(
        lock.heads,
        lock.layers,
        marker="s",
        s=max(1.0, (0.7 * cell) ** 2),
        facecolors="none",
        edgecolors="red",
        linewidths=1.2,
    )
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set(xlabel="head", ylabel="layer")
    name = src.name or src.architecture
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a local path: its last part says enough
        name = Path(name).name
    axis.set_title(
        f"{name[:60]}: {layers} layers x {heads} heads\nthe {lock.num_heads_selected} kept heads outlined in red",
        fontsize="medium",
    )
    return _encode(figure, fmt)
