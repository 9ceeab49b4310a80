"""Pictures, drawn by matplotlib (the optional extra ``pip install 'weightlock[plot]'``).

- ``eval_curves``: eval and tune's metrics against alpha (harmful compliance, over-refusal, QA accuracy,
  degenerate answers; KL on its own axis), with the alpha tune chose marked;
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


def eval_curves(results, title: str, fmt: str = "png", chosen_alpha: float | None = None) -> bytes:
    """Rates and KL against alpha, one line per metric; results without an alpha are drawn at 0."""
    from matplotlib.ticker import PercentFormatter

    rows = sorted(results, key=lambda r: 0.0 if r.alpha is None else r.alpha)
    xs = [0.0 if r.alpha is None else r.alpha for r in rows]
    figure = _figure(11, 4.2)
    rates_axis, kl_axis = figure.subplots(1, 2)
    series = [
        ("harmful compliance", [r.harmful_compliance for r in rows], "tab:red", "o"),
        ("over-refusal", [r.over_refusal for r in rows], "tab:blue", "s"),
        ("degenerate answers", [r.degenerate for r in rows], "tab:gray", "^"),
    ]
    if any(r.qa_accuracy is not None for r in rows):
        series.append(("QA accuracy", [r.qa_accuracy for r in rows], "tab:green", "D"))
    for label, values, colour, marker in series:
        points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        rates_axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=colour, label=label)
    rates_axis.set(title="rates", xlabel="alpha", ylim=(-0.03, 1.03))
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
    for axis in (rates_axis, kl_axis):
        axis.grid(alpha=0.3)
        if chosen_alpha is not None:
            axis.axvline(
                chosen_alpha, color="black", linestyle="--", linewidth=1, label=f"chosen alpha {chosen_alpha:g}"
            )
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
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
