"""Training curves as PNG files, drawn from a run's metrics log (``logs/metrics.jsonl``).

A run already records everything in its JSONL log; this module only reads it back and draws one
panel per kind of quantity: loss, score and reward, KL, accuracy, throughput. Held-out metrics
(``eval/...``) are drawn as marked points over the training curve of the same name. After a resumed
crash the log holds some steps twice; the later line wins, as in the log's own convention.

matplotlib is an optional dependency (``pip install 'easyppo[plot]'``), imported only here and only
when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping

from etils import epath

METRICS_FILE = os.path.join("logs", "metrics.jsonl")
PLOTS_DIR = "plots"


@dataclasses.dataclass(frozen=True)
class Panel:
    """One picture: its file stem, its title and which metric names belong on it."""

    name: str
    title: str
    holds: Callable[[str], bool]


PANELS = (
    Panel("loss", "loss", lambda k: k == "loss" or k.endswith("_loss")),
    Panel(
        "reward",
        "score and reward",
        lambda k: k in ("score", "score_penalized", "total_reward", "reward_margin") or k.startswith("reward/"),
    ),
    Panel("kl", "KL", lambda k: k.startswith("kl_per") or k in ("approx_kl", "kl_loss", "sampler_kl")),
    Panel("accuracy", "accuracy", lambda k: "accuracy" in k),
    Panel("throughput", "throughput (tokens/s)", lambda k: k == "tokens_per_second"),
)


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted; the message names the path."""


def metrics_path(run: str) -> epath.Path:
    """The metrics log of a run directory (``RUN/logs/metrics.jsonl``), or ``run`` itself if it is one."""
    path = epath.Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise PlotError(f"{path}: no metrics log here (expected a run directory holding {METRICS_FILE})")
    return path


def read_series(lines: Iterable[str], source: str = "metrics") -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of every numeric metric in a metrics log's lines (later lines win)."""
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PlotError(f"{source}:{number}: not a metrics row with a 'step'") from None
        for key, value in row.items():
            if key in ("step", "wall_time") or isinstance(value, bool):
                continue
            try:
                number_value = float(value)
            except (TypeError, ValueError):
                continue
            series.setdefault(key, {})[step] = number_value
    return series


def panel_curves(series: Mapping[str, Mapping[int, float]], panel: Panel) -> dict[str, dict[int, float]]:
    """The curves of ``series`` that belong on ``panel`` (train names, and ``eval/`` names by their base)."""
    return {name: values for name, values in sorted(series.items()) if panel.holds(name.removeprefix("eval/"))}


def write_plots(run: str, output_dir: str | None = None) -> list[str]:
    """Draws every panel that has data; returns the PNG paths (``RUN/plots/`` unless ``output_dir``)."""
    source = metrics_path(run)
    series = read_series(source.read_text().splitlines(), str(source))
    panels = [(panel, curves) for panel in PANELS if (curves := panel_curves(series, panel))]
    if not panels:
        raise PlotError(f"{source}: no metric to plot (found: {', '.join(sorted(series)) or 'none'})")
    plt = _pyplot()
    out = epath.Path(output_dir) if output_dir else source.parent.parent / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, curves in panels:
        figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
        _draw(axes, panel, curves)
        written.append(_save(figure, out / f"{panel.name}.png", plt))
    figure, grid = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), layout="constrained", squeeze=False)
    for axes, (panel, curves) in zip(grid[0], panels, strict=True):
        _draw(axes, panel, curves)
    written.append(_save(figure, out / "curves.png", plt))
    return written


def _draw(axes, panel: Panel, curves: Mapping[str, Mapping[int, float]]) -> None:
    for name, values in curves.items():
        steps = sorted(step for step, value in values.items() if math.isfinite(value))
        points = [values[step] for step in steps]
        if name.startswith("eval/"):
            axes.plot(steps, points, marker="o", linestyle="--", label=name)
        else:
            axes.plot(steps, points, label=name)
    axes.set_title(panel.title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _save(figure, path: epath.Path, plt) -> str:
    with path.open("wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
    return str(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'easyppo[plot]'") from None
    return plt
