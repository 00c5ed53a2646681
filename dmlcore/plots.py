"""PNG plots of a run's history (matplotlib, Agg canvas, no global pyplot state).

Each function returns ``{file name: PNG bytes}`` so that ``outputs.commit``
can write them atomically with the other outputs.

* a run: ``loss_vs_step.png``, ``loss_vs_time.png`` (training loss, and the
  evaluation loss where measured), ``accuracy_vs_step.png``,
  ``accuracy_vs_time.png`` (evaluation accuracy, classifiers); FedAvg runs
  are drawn per round with integer ticks (and ``participants_vs_round.png``
  when the number of clients counted varies); parameter-server runs show the
  raw losses faintly under their running mean and add ``staleness_hist.png``
  (one bin per integer staleness). Titles name the run, the model, the
  strategy and the learning rate; accuracy axes span at least
  ``ACCURACY_MIN_SPAN``.
* a sweep: the same curves with one line per configuration
  (``sweep_loss_vs_step.png``, ``sweep_loss_vs_time.png``,
  ``sweep_accuracy_vs_step.png``, ``sweep_accuracy_vs_time.png``).
"""
from __future__ import annotations

import io

import numpy as np

__all__ = ["history_plots", "history_figures", "sweep_plots", "run_title", "accuracy_limits",
           "running_mean"]


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


ACCURACY_MIN_SPAN = 0.05      # an accuracy axis spans at least 5 points


def run_title(history, title=""):
    """``name: Model, Strategy, lr X`` from the history's attributes (what is known)."""
    import re

    attrs = getattr(history, "attrs", {}) or {}
    parts = [str(attrs[k]).split("(")[0] for k in ("model", "strategy") if attrs.get(k)]
    lr = re.search(r"\blr=([-+0-9.eE]+)", str(attrs.get("optimizer", "")))
    if lr:
        parts.append(f"lr {float(lr.group(1)):g}")
    what = ", ".join(parts)
    return f"{title}: {what}" if title and what else (title or what)


def accuracy_limits(values, min_span=ACCURACY_MIN_SPAN):
    """y-limits for accuracies: the data's range, widened to ``min_span`` (within [0, 1])."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if lo < 0.0:
        lo, hi = 0.0, max(hi - lo, min_span)
    if hi > 1.0:
        lo, hi = min(lo - (hi - 1.0), 1.0 - min_span), 1.0
    return max(lo, 0.0), min(hi, 1.0)


def running_mean(values, window):
    """Mean of the last ``window`` finite values at each point (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, v.size + 1)
    start = np.maximum(idx - window, 0)
    count = ccnt[idx] - ccnt[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[idx] - csum[start]) / count, np.nan)


def smoothing_window(n):
    return max(5, n // 50)


def _integer_ticks(axis):
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def history_plots(history, *, strategy_kind="sync", title=""):
    """Plots of one run's history: ``{file name: PNG bytes}``."""
    return {name: _png(fig) for name, fig in
            history_figures(history, strategy_kind=strategy_kind, title=title).items()}


def history_figures(history, *, strategy_kind="sync", title=""):
    """The figures of ``history_plots`` (matplotlib Figures), by file name."""
    out = {}
    title = run_title(history, title)
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
            if loss is not None and strategy_kind == "ps" and loss.size > 10:
                # asynchronous updates: each loss is one mini-batch's; show the trend
                window = smoothing_window(loss.size)
                ax.plot(x, loss, ".", ms=2, alpha=0.2, color="C0", label="training loss")
                ax.plot(x, running_mean(loss, window), lw=1.5, color="C0",
                        label=f"running mean of {window}")
            elif loss is not None:
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
            if suffix == "step" and x_name == "round":
                _integer_ticks(ax.xaxis)
            out[f"loss_vs_{x_name if suffix == 'step' else 'time'}.png"] = fig
        if acc is not None:
            fig, ax = _figure()
            ok = np.isfinite(acc)
            ax.plot(x[ok], acc[ok], "o-", ms=3, color="C2")
            ax.set_xlabel(label)
            ax.set_ylabel("evaluation accuracy")
            ax.set_ylim(*accuracy_limits(acc))
            ax.set_title(title or "accuracy")
            ax.grid(alpha=0.3)
            if suffix == "step" and x_name == "round":
                _integer_ticks(ax.xaxis)
            out[f"accuracy_vs_{x_name if suffix == 'step' else 'time'}.png"] = fig
    participants = _series(history, "participants")
    if strategy_kind == "fedavg" and participants is not None:
        counted = participants[np.isfinite(participants)]
        if counted.min() != counted.max():      # a flat line says nothing: not drawn
            fig, ax = _figure()
            ax.step(steps, participants, where="mid")
            ax.set_xlabel("round")
            ax.set_ylabel("clients counted")
            ax.set_title(title or "participants")
            ax.grid(alpha=0.3)
            _integer_ticks(ax.xaxis)
            _integer_ticks(ax.yaxis)
            out["participants_vs_round.png"] = fig
    staleness = _series(history, "staleness")
    if staleness is not None:
        values = staleness[np.isfinite(staleness)]
        fig, ax = _figure()
        lo, top = staleness_range(values)
        ax.hist(values, bins=np.arange(lo - 0.5, top + 1.5, 1.0), rwidth=0.85)
        if top - lo <= 20:
            ax.set_xticks(np.arange(lo, top + 1))
        else:
            _integer_ticks(ax.xaxis)
        ax.set_xlabel("staleness (versions behind)")
        ax.set_ylabel("updates")
        ax.set_title(title or "parameter-server staleness")
        out["staleness_hist.png"] = fig
    return out


def staleness_range(values):
    """(smallest, largest) staleness: the histogram's bins are the integers in between."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0, 0
    return int(np.floor(v.min())), int(np.ceil(v.max()))


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
            else:
                ax.set_ylim(*accuracy_limits(np.concatenate(
                    [v for v in (_series(h, metric) for _, h in curves) if v is not None])))
            ax.legend(fontsize="small")
            ax.set_title(title or f"sweep: {ylabel}")
            ax.grid(alpha=0.3)
            out[f"sweep_{name}_vs_{'step' if xkey == 'step' else 'time'}.png"] = _png(fig)
    return out
