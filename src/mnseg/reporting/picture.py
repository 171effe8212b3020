"""The report as one picture: its title, verdict, learning curves and an example overlay in ``report.png``.

For readers who open images rather than markdown or HTML (a chat, an issue, an image viewer). Drawn from the
report's own figures (``figures/*.png``) with matplotlib's object API, so it shows exactly what the report shows.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from mnseg.reporting.overlays import save_figure

WIDTH_INCHES = 12.0
WRAP = 120  # characters per line of the header text


def pick_overlays(overlays: Sequence[tuple[str, Path]], count: int = 1) -> list[tuple[str, Path]]:
    """``count`` of the report's example cases, from the middle out (the median case first for 3 of them)."""
    order = sorted(range(len(overlays)), key=lambda i: (abs(i - (len(overlays) - 1) / 2), i))
    return [overlays[i] for i in sorted(order[:max(count, 0)])]


def report_figure(title: str, verdict: Sequence[str], curves_png: Path | None,
                  overlays: Sequence[tuple[str, Path]]):
    """A ``Figure``: a text header (title, verdict lines), then the curves picture and each overlay with its
    caption, stacked at full width with their own aspect ratios."""
    import matplotlib.image
    from matplotlib.figure import Figure

    header = [textwrap.fill(line, WRAP) for line in verdict]
    header_lines = sum(line.count("\n") + 1 for line in header)
    images = [("learning curves", Path(curves_png))] if curves_png is not None else []
    images += [(f"example test case {caption}", Path(png)) for caption, png in overlays]
    pixels = [matplotlib.image.imread(png) for _, png in images]
    heights = [0.5 + 0.22 * header_lines] + [WIDTH_INCHES * p.shape[0] / p.shape[1] + 0.3 for p in pixels]
    fig = Figure(figsize=(WIDTH_INCHES, sum(heights)), dpi=100)
    axes = fig.subplots(len(heights), 1, squeeze=False, gridspec_kw={"height_ratios": heights, "hspace": 0.02})
    axes = axes[:, 0]
    fig.subplots_adjust(left=0.01, right=0.99, top=0.995, bottom=0.005)
    head = axes[0]
    head.axis("off")
    head.text(0.0, 1.0, title, fontsize=14, fontweight="bold", va="top", transform=head.transAxes)
    head.text(0.0, 1.0 - 0.42 / heights[0], "\n".join(header), fontsize=10, va="top", transform=head.transAxes)
    for ax, (caption, _), image in zip(axes[1:], images, pixels, strict=True):
        ax.imshow(image, interpolation="lanczos")
        ax.set_title(caption, fontsize=10, loc="left")
        ax.axis("off")
    return fig


def report_picture(out_png: Path, title: str, verdict: Sequence[str], curves_png: Path | None,
                   overlays: Sequence[tuple[str, Path]], n_overlays: int = 1) -> Path:
    """Write ``report_figure`` with ``n_overlays`` of the overlays (``pick_overlays``) to ``out_png``."""
    return save_figure(report_figure(title, verdict, curves_png, pick_overlays(overlays, n_overlays)), out_png)
