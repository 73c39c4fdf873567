"""The model report's plots (app/services/reports.py)."""

from __future__ import annotations


def test_a_training_curve_of_one_epoch_keeps_a_readable_axis() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from app.services.reports import epoch_axis

    axes = Figure().add_subplot()
    axes.plot([3], [0.5], marker="o")
    epoch_axis(axes, [3])
    assert axes.get_xlim() == (2, 4)
    assert [tick for tick in axes.get_xticks() if 2 <= tick <= 4] == [2, 3, 4]
