"""Plot decisions (titles, axis limits, ticks, smoothing, which files) — not pixels."""
import numpy as np
import pytest
import xarray as xr

from dmlcore import plots


def _history(n=20, **series):
    data = {k: ("step", np.asarray(v, dtype=np.float64)) for k, v in series.items()}
    attrs = {"model": "MLP(sizes=[784, 256, 10])", "strategy": "FedAvg(clients_per_round=0.1)",
             "optimizer": "SGD(lr=0.05, momentum=0.9)"}
    return xr.Dataset(data, coords={"step": np.arange(1, n + 1)}, attrs=attrs)


def test_title_names_model_strategy_and_learning_rate():
    h = _history(loss=np.linspace(2, 1, 20))
    assert plots.run_title(h, "run") == "run: MLP, FedAvg, lr 0.05"
    fig = plots.history_figures(h, title="run")["loss_vs_step.png"]
    assert fig.axes[0].get_title() == "run: MLP, FedAvg, lr 0.05"


def test_accuracy_axis_does_not_zoom_onto_noise():
    acc = np.array([0.8108, 0.8122, 0.8115, 0.8110])
    lo, hi = plots.accuracy_limits(acc)
    assert hi - lo == pytest.approx(plots.ACCURACY_MIN_SPAN) and lo < 0.8108 < 0.8122 < hi
    assert plots.accuracy_limits([0.1, 0.9]) == pytest.approx((0.06, 0.94))
    assert plots.accuracy_limits([0.999, 1.0]) == pytest.approx((1 - plots.ACCURACY_MIN_SPAN, 1))
    assert plots.accuracy_limits([0.0, 0.001])[0] == 0.0
    h = _history(4, loss=[1, 0.9, 0.8, 0.7], eval_accuracy=acc)
    ax = plots.history_figures(h)["accuracy_vs_step.png"].axes[0]
    assert ax.get_ylim() == pytest.approx(plots.accuracy_limits(acc))


def test_round_axes_get_integer_ticks():
    h = _history(4, loss=[1, 0.9, 0.8, 0.7], eval_accuracy=[0.5, 0.6, 0.7, 0.8])
    figs = plots.history_figures(h, strategy_kind="fedavg")
    for name in ("loss_vs_round.png", "accuracy_vs_round.png"):
        ax = figs[name].axes[0]
        ax.figure.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_participants_plot_only_when_participation_varies():
    loss = np.linspace(2, 1, 6)
    flat = plots.history_figures(_history(6, loss=loss, participants=[10] * 6),
                                 strategy_kind="fedavg")
    assert "participants_vs_round.png" not in flat
    varying = plots.history_figures(_history(6, loss=loss, participants=[10, 9, 10, 8, 10, 10]),
                                    strategy_kind="fedavg")
    assert "participants_vs_round.png" in varying


def test_parameter_server_loss_is_smoothed_over_faint_raw_points():
    rng = np.random.default_rng(0)
    loss = 1 + rng.random(300)
    ax = plots.history_figures(_history(300, loss=loss), strategy_kind="ps")[
        "loss_vs_step.png"].axes[0]
    raw, mean = ax.lines[0], ax.lines[1]
    window = plots.smoothing_window(300)
    assert raw.get_alpha() < 0.5 and mean.get_label() == f"running mean of {window}"
    expected = np.array([loss[max(0, i + 1 - window):i + 1].mean() for i in range(300)])
    np.testing.assert_allclose(mean.get_ydata(), expected)


def test_staleness_histogram_has_one_centred_bin_per_integer():
    staleness = np.array([1, 1, 2, 3, 3, 3, 5], dtype=float)
    ax = plots.history_figures(_history(7, loss=np.ones(7), staleness=staleness),
                               strategy_kind="ps")["staleness_hist.png"].axes[0]
    heights = [p.get_height() for p in ax.patches]
    centres = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    assert centres == pytest.approx([1, 2, 3, 4, 5])
    assert heights == [2, 1, 3, 0, 1]            # no empty bin at either edge
    assert list(ax.get_xticks()) == [1, 2, 3, 4, 5]


def test_history_plots_writes_png_bytes():
    files = plots.history_plots(_history(4, loss=[1, 0.9, 0.8, 0.7]))
    assert set(files) == {"loss_vs_step.png"}
    assert files["loss_vs_step.png"].startswith(b"\x89PNG")
