"""The report's figures, checked structurally: every task and arm told apart,
colour bars where colour carries a value, no panel of a constant, labelled
axes with readable ticks, and every abbreviation defined in report.md."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from experiments import config as C  # noqa: E402
from experiments import metrics as M  # noqa: E402
from experiments.io import write_json  # noqa: E402
from experiments.report import GLOSSARY, _supervised_figures, render  # noqa: E402

MIN_TICK_SIZE = 8


@pytest.fixture
def figures(monkeypatch):
    """{figure file stem: Figure} of every figure saved while the test runs."""
    saved: dict[str, Figure] = {}
    original = Figure.savefig

    def record(self, path, *args, **kwargs):
        saved[Path(path).stem] = self
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def _accuracy_matrix(t: int, decay: float) -> list[list[float]]:
    """An accuracy matrix in which each old task loses ``decay`` per experience."""
    return [[max(0.0, 0.9 - decay * (k - i)) if i <= k else 0.1 for i in range(t)] for k in range(t)]


def _cl_run(folder: Path, lr: float, seed: int, t: int, buffer: bool = True) -> None:
    optimizer = "adam_cm" if buffer else "adam"
    cfg = C.resolve(C.RunConfig(benchmark="permuted_mnist", preset="smoke", optimizer=optimizer, lr=lr, seed=seed,
                                n_experiences=t)).to_dict()
    r = _accuracy_matrix(t, 0.01 + 2 * lr + 0.005 * seed)
    m = {"benchmark": "permuted_mnist", "scenario": "domain-incremental", "preset": "smoke", "strategy": "naive",
         "optimizer": optimizer, "seed": seed, "n_experiences": t, "accuracy_matrix": r, **M.summary(r),
         "distance_per_experience": [1.0 + lr + 0.1 * k for k in range(t)],
         "distance_from_init": [2.0 + lr + 0.3 * k for k in range(t)],
         "sharpness_matrix": [[5.0 + i + seed if j == i else None for j in range(t)] for i in range(t)]}
    if buffer:  # size and capacity constant: their panels must go
        m["buffer_stats"] = {"per_experience": {
            "size": [5] * t, "capacity": [5] * t, "exploration": [0.5 + 0.05 * k + lr for k in range(t)],
            "cosine_similarity": [0.8 - 0.01 * k for k in range(t)], "replacement_rate": [1.0] * t}}
    run = folder / f"{optimizer}-{lr:g}" / f"seed{seed}"
    write_json(run / "config.json", {"config": cfg, "protocol": "fake"})
    write_json(run / "metrics.json", m)


def _data_axes(fig: Figure):
    """Visible axes that hold data (not colour bars)."""
    return [ax for ax in fig.axes if ax.get_visible() and not hasattr(ax, "_colorbar")
            and (ax.lines or ax.collections or ax.images or ax.patches)]


def _colorbars(fig: Figure):
    return [ax._colorbar for ax in fig.axes if hasattr(ax, "_colorbar")]


def _legend_entries(fig: Figure) -> list[tuple[str, str]]:
    """(label, colour) of every entry of the figure's legends."""
    out = []
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            color = handle.get_color() if hasattr(handle, "get_color") else handle.get_facecolor()
            out.append((text.get_text(), to_hex(np.ravel(color)[:3] if not isinstance(color, str) else color)))
    return out


def _check_readable(name: str, fig: Figure) -> None:
    """Labelled axes (own label or the figure's shared one), tick labels of at
    least MIN_TICK_SIZE points, no axes whose lines only show a constant."""
    sup_x = fig._supxlabel.get_text() if getattr(fig, "_supxlabel", None) else ""
    sup_y = fig._supylabel.get_text() if getattr(fig, "_supylabel", None) else ""
    axes = _data_axes(fig)
    assert axes, name
    for ax in axes:
        assert ax.get_xlabel() or sup_x, f"{name}: an axes without an x label"
        y_labelled = ax.get_ylabel() or sup_y or any(a.get_ylabel() for a in axes if a.get_shared_y_axes().joined(a, ax))
        assert y_labelled, f"{name}: an axes without a y label"
        for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if label.get_text():
                assert label.get_fontsize() >= MIN_TICK_SIZE, f"{name}: tick label of {label.get_fontsize()} pt"
        ys = [float(y) for line in ax.lines for y in np.ravel(line.get_ydata()) if np.isfinite(y)]
        if ax.lines and not ax.patches:  # a bar chart's lines are its error bars
            assert max(ys) - min(ys) > 1e-9, f"{name}: {ax.get_title()!r} shows a constant"


def _glossary_terms(report: str) -> dict[str, str]:
    body, _, glossary = report.partition("## Glossary")
    assert glossary, "report.md has no glossary"
    terms = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", glossary, flags=re.M))
    for term, pattern, _ in GLOSSARY:  # every term the body uses is defined
        if re.search(pattern, body):
            assert term in terms, f"{term} is used but not in the glossary"
    return terms


@pytest.mark.parametrize("t", [3, 12])
def test_continual_figures_tell_every_task_and_arm_apart(tmp_path, figures, t):
    runs = tmp_path / "runs"
    lrs = [0.001 * (i + 1) for i in range(11 if t == 3 else 2)]  # 11 arms: past tab10's colours
    for lr in lrs:
        for seed in range(2):
            _cl_run(runs, lr, seed, t, buffer=lr != lrs[0])
    report = render(runs, tmp_path / "report").read_text()
    arms = [f"adam lr={lrs[0]:g}"] + [f"adam_cm/keep lr={lr:g}" for lr in lrs[1:]]
    slug = "permuted_mnist-smoke-naive"
    assert set(figures) == {f"{slug}-{name}" for name in ("accuracy-matrix", "task-curves", "forgetting",
                                                          "acc-vs-forgetting", "buffer-stats",
                                                          "distance-vs-forgetting", "sharpness-vs-forgetting")}
    for name, fig in figures.items():
        _check_readable(name, fig)

    # the mechanism table: a row per arm with its distances (and sharpness, recorded here), then ranks
    mechanism = report[report.index("Mechanism, per arm"):]
    table = [line for line in mechanism.split("\n\n")[1].splitlines() if line.startswith("| `")]
    assert len(table) == len(arms) and "mean λmax after learning" in mechanism.splitlines()[2]
    assert ("Spearman ρ" in mechanism) == (len(arms) >= 4)
    ranks = [line for line in mechanism.splitlines() if "against forgetting over the" in line]
    assert len(ranks) == (3 if len(arms) >= 4 else 0)  # one per column: a correlation, or why there is none
    assert all(("Spearman ρ = " in line and "nan" not in line) or "no rank correlation" in line for line in ranks)

    # heatmaps: every matrix coloured on one scale with a labelled colour bar
    heat = figures[f"{slug}-accuracy-matrix"]
    images = [im for ax in heat.axes for im in ax.images]
    assert len(images) == len(arms)
    (bar,) = _colorbars(heat)
    assert bar.ax.get_ylabel() == "accuracy (%)" and bar.mappable in images
    assert {(im.get_clim(), im.get_cmap().name) for im in images} == {((0, 100), bar.cmap.name)}

    # task curves: one line per task in each panel, each task its own colour, named in a legend or on a bar
    curves = figures[f"{slug}-task-curves"]
    for ax in _data_axes(curves):
        colors = [to_hex(line.get_color()) for line in ax.lines]
        assert len(colors) == t and len(set(colors)) == t
    if t <= 10:
        entries = _legend_entries(curves)
        assert [label for label, _ in entries] == [f"task {i}" for i in range(t)]
        assert len({color for _, color in entries}) == t
        assert not _colorbars(curves)
    else:
        (bar,) = _colorbars(curves)
        assert "task" in bar.ax.get_ylabel() and (bar.norm.vmin, bar.norm.vmax) == (0, t - 1)
        assert not _legend_entries(curves)

    # arms: every one in the legend, each its own colour
    for name in ("acc-vs-forgetting", "distance-vs-forgetting", "sharpness-vs-forgetting"):
        entries = _legend_entries(figures[f"{slug}-{name}"])
        assert [label for label, _ in entries] == arms, name
        assert len({color for _, color in entries}) == len(arms), name
    forgetting_bars = figures[f"{slug}-forgetting"]
    assert [label.get_text() for label in forgetting_bars.axes[0].get_yticklabels()] == arms

    # buffer statistics: constant size, capacity and replacement rate are named, not drawn; only arms with a buffer
    buffer = figures[f"{slug}-buffer-stats"]
    titles = {ax.get_title() for ax in _data_axes(buffer)}
    assert titles == {"exploration ‖mean(B)‖ / ‖m‖", "cosine of stored entries"}
    assert [label for label, _ in _legend_entries(buffer)] == arms[1:]
    assert "Not drawn: size is 5 in every run; capacity equals size in every run" in report
    assert "replacement_rate is 1 in every run" in report

    terms = _glossary_terms(report)
    for term in ("ACC", "BWT", "LA", "forgetting (FGT)", "λmax", "pp", "n", "CI", "θ, ‖·‖₂", "B, m"):
        assert term in terms, term
    assert "escape ratio" not in terms and "perplexity" not in terms  # only what the report uses


def test_supervised_figures_name_every_optimizer_and_leave_out_constant_buffer_statistics(tmp_path, figures):
    (tmp_path / "figures").mkdir()
    labels = ["adam", "adam_cg", "adam_cm"]

    def run(lab, seed):
        buffer = [] if lab == "adam" else [{"iteration": i, "cosine_similarity": 0.1 * i + seed,
                                           "exploration": 1.0} for i in range(4)]
        return {"metrics": {"history": [{"epoch": e, "test_accuracy": 0.5 + 0.1 * e + 0.01 * seed} for e in range(3)],
                            "top_hessian_eigenvalue": 10.0 + labels.index(lab) + seed, "buffer_series": buffer}}

    lines = _supervised_figures("cifar", {lab: [run(lab, s) for s in range(2)] for lab in labels}, labels, False,
                                tmp_path)
    assert set(figures) == {"cifar-curves", "cifar-sharpness", "cifar-buffer"}
    for name, fig in figures.items():
        _check_readable(name, fig)
    assert [label for label, _ in _legend_entries(figures["cifar-curves"])] == labels
    assert len({color for _, color in _legend_entries(figures["cifar-curves"])}) == 3
    assert [label for label, _ in _legend_entries(figures["cifar-buffer"])] == ["adam_cg", "adam_cm"]
    assert [ax.get_title() for ax in _data_axes(figures["cifar-buffer"])] == ["cosine of stored entries"]
    assert any("Not drawn: exploration ‖mean(B)‖ / ‖m‖ is 1 throughout" in line for line in lines)
    assert figures["cifar-sharpness"].axes[0].get_xlabel() == "λmax at the end of training"


def _toy_run(folder: Path, sharpness: float, seed: int) -> None:
    optimizers = ["adam", "adam_cg", "adam_cm"]
    cfg = {"landscape": "sharp_wide", "sharpness": sharpness, "optimizers": optimizers, "starts": 2, "steps": 3,
           "lr": 0.05, "rho": 0.05, "seed": seed, "extra": {}}
    starts = [[0.1, 0.1], [-0.1, 0.2]]
    results = {}
    for name in optimizers:
        escaped = [name == "adam_cm" and sharpness < 0.4, False]
        results[name] = {"final_loss": [0.1, 0.1], "travelled": [0.5, 0.5], "escaped": escaped,
                         "escape_ratio": sum(escaped) / 2, "mean_final_loss": 0.1, "mean_travelled": 0.5,
                         "trajectories": [[p, [p[0] + 0.3, p[1]]] for p in starts]}
    run = folder / f"s{sharpness:g}" / f"seed{seed}"
    write_json(run / "config.json", {"config": cfg})
    write_json(run / "metrics.json", {"kind": "toy", "config": cfg, "starts": starts, "results": results})


def test_toy_figures_are_labelled_and_coinciding_curves_are_named(tmp_path, figures):
    runs = tmp_path / "toy"
    for s in (0.2, 0.5):
        for seed in range(2):
            _toy_run(runs, s, seed)
    report = render(runs, tmp_path / "report").read_text()
    assert set(figures) == {"toy-sharp_wide-s0.2", "toy-sharp_wide-s0.5", "toy-escape-vs-sharpness"}
    for name, fig in figures.items():
        _check_readable(name, fig)
    trajectories = figures["toy-sharp_wide-s0.2"]
    assert [bar.ax.get_ylabel() for bar in _colorbars(trajectories)] == ["loss f(x)"]
    escape = figures["toy-escape-vs-sharpness"]
    assert [label for label, _ in _legend_entries(escape)] == ["adam", "adam_cg", "adam_cm"]
    assert "adam, adam_cg have the same escape ratio at every s." in report
    terms = _glossary_terms(report)
    assert "escape ratio" in terms and "s" in terms and "ACC" not in terms
