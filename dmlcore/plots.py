"""PNG plots of a run's history (matplotlib, Agg canvas, no global pyplot state).

Each function returns ``{file name: PNG bytes}`` so that ``outputs.commit``
can write them atomically with the other outputs.

* a run: ``loss_vs_step.png``, ``loss_vs_time.png`` (training loss, and the
  evaluation loss where measured), ``accuracy_vs_step.png``,
  ``accuracy_vs_time.png`` (evaluation accuracy, classifiers); FedAvg runs
  are drawn per round (and ``participants_vs_round.png``); parameter-server
  runs add ``staleness_hist.png``.
* a sweep: the same curves with one line per configuration
  (``sweep_loss_vs_step.png``, ``sweep_loss_vs_time.png``,
  ``sweep_accuracy_vs_step.png``, ``sweep_accuracy_vs_time.png``).
"""
from __future__ import annotations

import io

import numpy as np

__all__ = ["history_plots", "sweep_plots"]


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(history, name):
    if name not in history:
        return None
    values = np.asarray(history[name].values, dtype=np.float64)
    return values if np.isfinite(values).any() else None


def history_plots(history, *, strategy_kind="sync", title=""):
    """Plots of one run's history."""
    out = {}
    x_name = "round" if strategy_kind == "fedavg" else "step"
    steps = np.asarray(history["step"].values)
    time = _series(history, "wall_time")
    loss, eval_loss = _series(history, "loss"), _series(history, "eval_loss")
    acc = _series(history, "eval_accuracy")
    axes = [(x_name, steps, "step")]
    if time is not None:
        axes.append(("wall time (s)", time, "time"))
    for label, x, suffix in axes:
        if loss is not None or eval_loss is not None:
            fig, ax = _figure()
            if loss is not None:
                ax.plot(x, loss, lw=1.2, label="training loss")
            if eval_loss is not None:
                ok = np.isfinite(eval_loss)
                ax.plot(x[ok], eval_loss[ok], "o-", ms=3, label="evaluation loss")
            ax.set_xlabel(label)
            ax.set_ylabel("loss")
            _log_if_useful(ax, loss)
            ax.legend()
            ax.set_title(title or "loss")
            ax.grid(alpha=0.3)
            out[f"loss_vs_{x_name if suffix == 'step' else 'time'}.png"] = _png(fig)
        if acc is not None:
            fig, ax = _figure()
            ok = np.isfinite(acc)
            ax.plot(x[ok], acc[ok], "o-", ms=3, color="C2")
            ax.set_xlabel(label)
            ax.set_ylabel("evaluation accuracy")
            ax.set_title(title or "accuracy")
            ax.grid(alpha=0.3)
            out[f"accuracy_vs_{x_name if suffix == 'step' else 'time'}.png"] = _png(fig)
    participants = _series(history, "participants")
    if strategy_kind == "fedavg" and participants is not None:
        fig, ax = _figure()
        ax.step(steps, participants, where="mid")
        ax.set_xlabel("round")
        ax.set_ylabel("clients counted")
        ax.set_title(title or "participants")
        ax.grid(alpha=0.3)
        out["participants_vs_round.png"] = _png(fig)
    staleness = _series(history, "staleness")
    if staleness is not None:
        values = staleness[np.isfinite(staleness)]
        fig, ax = _figure()
        top = int(values.max()) if values.size else 0
        ax.hist(values, bins=np.arange(-0.5, top + 1.5, 1.0), rwidth=0.85)
        ax.set_xlabel("staleness (versions behind)")
        ax.set_ylabel("updates")
        ax.set_title(title or "parameter-server staleness")
        out["staleness_hist.png"] = _png(fig)
    return out


def _log_if_useful(ax, values):
    if values is None:
        return
    v = values[np.isfinite(values)]
    if v.size and v.min() > 0 and v.max() / v.min() > 50:
        ax.set_yscale("log")


def sweep_plots(curves, *, title=""):
    """One line per configuration; ``curves`` = [(label, history)]."""
    out = {}
    for metric, ylabel in (("loss", "training loss"), ("eval_accuracy", "evaluation accuracy")):
        if not any(_series(h, metric) is not None for _, h in curves):
            continue
        name = "loss" if metric == "loss" else "accuracy"
        for xkey, xlabel in (("step", "step"), ("wall_time", "wall time (s)")):
            fig, ax = _figure()
            for label, h in curves:
                y = _series(h, metric)
                x = (np.asarray(h["step"].values) if xkey == "step" else _series(h, "wall_time"))
                if y is None or x is None:
                    continue
                ok = np.isfinite(y)
                ax.plot(x[ok], y[ok], "-" if metric == "loss" else "o-", ms=3, lw=1.2,
                        label=label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if metric == "loss":
                _log_if_useful(ax, np.concatenate(
                    [v for v in (_series(h, "loss") for _, h in curves) if v is not None]))
            ax.legend(fontsize="small")
            ax.set_title(title or f"sweep: {ylabel}")
            ax.grid(alpha=0.3)
            out[f"sweep_{name}_vs_{'step' if xkey == 'step' else 'time'}.png"] = _png(fig)
    return out
