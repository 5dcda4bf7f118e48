"""The forgetting analysis: every finished run under a folder, as a markdown
report with seaborn figures.

For each benchmark, preset and strategy it gives a table of ACC, BWT,
forgetting and learning accuracy (mean ± std over seeds, with the number of
seeds) for every optimizer and boundary policy; each one's paired difference
to Adam over the seeds they share, with a 95% confidence interval (Student t);
the published anchors whose protocol matches; and figures: accuracy-matrix
heatmaps, per-task accuracy curves, forgetting bars, an ACC-against-forgetting
scatter, buffer statistics across experiences and, where recorded, sharpness
against forgetting.
"""
from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import config as C
from .io import read_json, write_text

METRICS = (("acc", "ACC (%)", 100), ("bwt", "BWT (pp)", 100), ("forgetting", "forgetting (pp)", 100),
           ("learning_accuracy", "LA (%)", 100))
ANCHORS = Path(__file__).parent / "anchors.toml"
BASELINE = "adam"


def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """Every complete run (metrics.json and config.json) under ``folder``."""
    runs = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        cfg_path = path.parent / "config.json"
        if not cfg_path.exists():
            continue
        runs.append({"folder": path.parent, "metrics": read_json(path), **read_json(cfg_path)})
    return runs


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval); half-width is NaN for n < 2."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def effective_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with the optimizer's and strategy's defaults filled in."""
    from strategies import optimizer_options, strategy_options

    settings = dict(cfg)
    settings.update({k: v for k, v in optimizer_options(cfg["optimizer"]).items() if cfg.get(k) is None})
    for name, arg in C.STRATEGY_FIELDS.items():
        if cfg.get(name) is None and arg in strategy_options(cfg["strategy"]):
            settings[name] = strategy_options(cfg["strategy"])[arg]
    return settings


def matching_anchors(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Anchors of ``anchors.toml`` whose whole protocol equals this run's."""
    anchors = tomllib.loads(ANCHORS.read_text())["anchor"]
    settings = effective_settings(cfg)
    return [a for a in anchors if a["benchmark"] == cfg["benchmark"]
            and all(settings.get(k) == v for k, v in a["match"].items())]


def _fmt(mean: float, spread: float, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if spread is None or math.isnan(spread) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _group_runs(runs):
    """{(benchmark, preset, strategy, protocol): {row label: [runs]}}; a row is
    one optimizer, policy and explicit hyperparameter setting, over seeds."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cfg = run["config"]
        label = C.run_label(C.RunConfig(**{k: v for k, v in cfg.items() if k in C.FIELD_NAMES}))
        protocol = tuple(cfg[k] for k in C.PROTOCOL_FIELDS)
        groups[(cfg["benchmark"], cfg["preset"], cfg["strategy"], protocol)][label].append(run)
    return groups


def _policy_order(policies):
    return sorted(policies, key=lambda p: (not p.startswith(BASELINE + " ") and p != BASELINE, p))


def _baseline_for(label: str, by_policy) -> str | None:
    """The Adam row with the same learning rate as ``label``'s run."""
    lr = effective_settings(by_policy[label][0]["config"])["lr"]
    for candidate in _policy_order(by_policy):
        if candidate.split(" ")[0] == BASELINE and effective_settings(by_policy[candidate][0]["config"])["lr"] == lr:
            return candidate
    return None


def render(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` and its figures; return the report's path."""
    folder = Path(folder)
    out = Path(out) if out else folder / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = load_runs(folder)
    lines = ["# Forgetting analysis", "",
             f"{len(runs)} finished run(s) under `{folder}`. Accuracies in %, BWT and forgetting in "
             "percentage points; mean ± std over seeds; n = number of seeds. Differences to Adam are paired by "
             "seed, with a 95% Student-t confidence interval.", ""]
    if not runs:
        lines.append("No finished runs (a run is finished when its folder holds metrics.json).")
    groups = _group_runs(runs)
    for index, ((bench, preset, strategy, _), by_policy) in enumerate(sorted(groups.items(), key=str)):
        same = sum(1 for (b, p, s, _) in groups if (b, p, s) == (bench, preset, strategy))
        lines += _section(bench, preset, strategy, by_policy, out, suffix=f"-{index}" if same > 1 else "")
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report


def _section(bench, preset, strategy, by_policy, out: Path, suffix: str = "") -> list[str]:
    first = next(iter(by_policy.values()))[0]
    cfg, m0 = first["config"], first["metrics"]
    slug = f"{bench}-{preset}-{strategy}{suffix}"
    lines = [f"## {bench}, preset `{preset}`, strategy `{strategy}`", "",
             f"*Scenario:* {m0['scenario']}. *Protocol:* {first.get('protocol', '')}.", "",
             f"*Settings:* {cfg['n_experiences']} experiences, {cfg['epochs']} epoch(s) each, batch "
             f"{cfg['batch_size']}, model {cfg['model']} (width {cfg['width']}), "
             f"{'all' if not cfg['train_per_class'] else cfg['train_per_class']} training samples per class; "
             "optimizer settings per row below (defaults of `strategies.make_optimizer` unless given).", ""]
    policies = _policy_order(by_policy)
    has_task_il = "task_il" in m0
    header = ["optimizer / policy", "n", "lr", "seeds"] + [label for _, label, _ in METRICS]
    if has_task_il:
        header.append("task-IL ACC (%)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    anchors_found = []
    for policy in policies:
        rs = by_policy[policy]
        settings = effective_settings(rs[0]["config"])
        cells = [f"`{policy}`", str(len(rs)), f"{settings.get('lr', '')}",
                 ",".join(str(r["metrics"]["seed"]) for r in rs)]
        for key, _, scale in METRICS:
            vals = [scale * r["metrics"][key] for r in rs if r["metrics"][key] is not None]
            cells.append(_fmt(np.mean(vals) if vals else math.nan, np.std(vals, ddof=1) if len(vals) > 1 else math.nan))
        if has_task_il:
            vals = [100 * r["metrics"]["task_il"]["acc"] for r in rs]
            cells.append(_fmt(np.mean(vals), np.std(vals, ddof=1) if len(vals) > 1 else math.nan))
        lines.append("| " + " | ".join(cells) + " |")
        for anchor in matching_anchors(rs[0]["config"]):
            anchors_found.append((policy, anchor))
    lines.append("")
    if anchors_found:
        lines += ["Published anchors with the same protocol:", ""]
        for policy, a in anchors_found:
            ours = [100 * r["metrics"]["acc"] for r in by_policy[policy]]
            vals = ", ".join(f"{k} {a[k]}" for k in ("acc", "acc_task_il", "forgetting") if k in a)
            lines.append(f"- `{policy}` (ours: ACC {_fmt(np.mean(ours), np.std(ours, ddof=1) if len(ours) > 1 else math.nan)}): "
                         f"**{a['name']}**: {vals}. Source: {a['source']}.")
        lines.append("")
    else:
        lines += ["No published anchor has exactly this protocol, so none is shown.", ""]
    lines += _paired(by_policy, policies)
    lines += _figures(slug, by_policy, policies, out)
    return lines


def _paired(by_policy, policies) -> list[str]:
    lines = ["Paired difference to Adam at the same learning rate (same seeds), mean and 95% CI:", "",
             "| optimizer / policy | against | pairs | " + " | ".join(f"Δ {label}" for _, label, _ in METRICS) + " |",
             "|" + "---|" * (3 + len(METRICS))]
    verdicts = []
    for policy in policies:
        baseline = _baseline_for(policy, by_policy)
        if policy.split(" ")[0] == BASELINE:
            continue
        if baseline is None:
            lines.append(f"| `{policy}` | no Adam run with this lr | 0 |" + " n/a |" * len(METRICS))
            continue
        base = {r["metrics"]["seed"]: r["metrics"] for r in by_policy[baseline]}
        pairs = [(r["metrics"], base[r["metrics"]["seed"]]) for r in by_policy[policy]
                 if r["metrics"]["seed"] in base]
        cells = [f"`{policy}`", f"`{baseline}`", str(len(pairs))]
        for key, _, scale in METRICS:
            diffs = [scale * (a[key] - b[key]) for a, b in pairs if a[key] is not None and b[key] is not None]
            mean, half = t_interval(diffs) if diffs else (math.nan, math.nan)
            cells.append(f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" if not math.isnan(half)
                         else (f"{mean:+.2f} (CI needs 2 seeds)" if not math.isnan(mean) else "n/a"))
            if key == "acc" and not math.isnan(mean):
                verdicts.append(_verdict(policy, mean, half, len(diffs)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + verdicts + [""]


def _verdict(policy: str, mean: float, half: float, n: int) -> str:
    if math.isnan(half):
        return f"- `{policy}`: ACC {mean:+.2f} pp against Adam from {n} seed; no interval with one seed."
    lo, hi = mean - half, mean + half
    if lo > 0:
        word = "higher than Adam's: the whole 95% interval is above zero"
    elif hi < 0:
        word = "lower than Adam's: the whole 95% interval is below zero"
    else:
        word = "not distinguishable from Adam's: the 95% interval contains zero"
    return f"- `{policy}`: ACC {mean:+.2f} pp [{lo:+.2f}, {hi:+.2f}] over {n} seeds, {word}."


# ------------------------------------------------------------------- figures
def _wrap(label: str) -> str:
    """Row labels on figures: one setting per line."""
    return label.replace(" ", "\n")


def _figures(slug: str, by_policy, policies, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = dict(zip(policies, sns.color_palette("colorblind", len(policies))))
    files = []

    def save(fig, name):
        from matplotlib.ticker import MaxNLocator

        for ax in fig.axes if name in ("task-curves", "buffer-stats") else ():
            if "experience" in ax.get_xlabel():
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not hasattr(fig, "_suptitle") or fig._suptitle is None or name == "accuracy-matrix":
            fig.tight_layout()
        path = out / "figures" / f"{slug}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append((name, path.relative_to(out)))

    # accuracy matrices
    n = len(policies)
    cols = min(n, 3)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols + 0.8, 3.5 * rows_), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, policy in zip(axes.flat, policies):
        mats = np.array([r["metrics"]["accuracy_matrix"] for r in by_policy[policy]]) * 100
        t = mats.shape[1]
        sns.heatmap(mats.mean(0), ax=ax, vmin=0, vmax=100, cmap="viridis", annot=t <= 10, fmt=".0f",
                    annot_kws={"size": 6}, cbar=False, square=True)
        ax.set_title(f"{_wrap(policy)} (n={len(mats)})", fontsize=8)
        ax.set_xlabel("evaluated experience")
        ax.set_ylabel("after training experience")
    fig.suptitle("Accuracy matrix (%), mean over seeds", fontsize=10)
    save(fig, "accuracy-matrix")

    # per-task accuracy curves
    rows = []
    for policy in policies:
        for r in by_policy[policy]:
            mat = r["metrics"]["accuracy_matrix"]
            for k, row in enumerate(mat):
                for i, v in enumerate(row[: k + 1]):
                    rows.append({"policy": policy, "after experience": k, "task": i, "accuracy (%)": 100 * v})
    df = pd.DataFrame(rows)
    df["policy"] = df["policy"].map(_wrap)
    grid = sns.relplot(data=df, x="after experience", y="accuracy (%)", hue="task", col="policy",
                       col_order=[_wrap(p) for p in policies], col_wrap=min(n, 3), kind="line", errorbar="sd",
                       palette="crest", height=2.8, aspect=1.2, facet_kws={"sharey": True})
    grid.set_titles("{col_name}", size=8)
    grid.figure.suptitle("Accuracy on each task across training (mean ± sd over seeds)", y=1.03, fontsize=10)
    save(grid.figure, "task-curves")

    # forgetting bars and ACC-forgetting scatter
    summary = pd.DataFrame([{"policy": p, "seed": r["metrics"]["seed"], "ACC (%)": 100 * r["metrics"]["acc"],
                             "forgetting (pp)": 100 * (r["metrics"]["forgetting"] or 0.0)}
                            for p in policies for r in by_policy[p]])
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 3.2))
    sns.barplot(data=summary, x="policy", y="forgetting (pp)", order=policies, errorbar="sd", capsize=0.2,
                palette=palette, hue="policy", legend=False, ax=ax)
    ax.set_xlabel("")
    ax.set_xticks(range(n), [_wrap(p) for p in policies], rotation=0, fontsize=7)
    ax.set_title("Forgetting (mean ± sd over seeds)", fontsize=10)
    save(fig, "forgetting")

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    sns.scatterplot(data=summary, x="forgetting (pp)", y="ACC (%)", hue="policy", hue_order=policies,
                    palette=palette, alpha=0.5, ax=ax)
    means = summary.groupby("policy")[["forgetting (pp)", "ACC (%)"]].mean()
    for policy, row in means.iterrows():
        ax.scatter(row["forgetting (pp)"], row["ACC (%)"], color=palette[policy], marker="X", s=120,
                   edgecolor="black", linewidth=0.6)
    ax.set_title("ACC against forgetting (dots: seeds, crosses: means)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    save(fig, "acc-vs-forgetting")

    # buffer statistics across experiences
    rows = []
    for policy in policies:
        for r in by_policy[policy]:
            for key, values in r["metrics"].get("buffer_stats", {}).get("per_experience", {}).items():
                for k, v in enumerate(values):
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        rows.append({"policy": policy, "statistic": key, "experience": k, "value": v})
    if rows:
        grid = sns.relplot(data=pd.DataFrame(rows), x="experience", y="value", hue="policy", col="statistic",
                           col_wrap=3, kind="line", errorbar="sd", palette=palette, height=2.6, aspect=1.2,
                           facet_kws={"sharey": False}, marker="o")
        grid.figure.suptitle("Buffer statistics at the end of each experience", y=1.03, fontsize=10)
        save(grid.figure, "buffer-stats")

    # sharpness against forgetting
    rows = []
    for policy in policies:
        for r in by_policy[policy]:
            mat, sharp = r["metrics"]["accuracy_matrix"], r["metrics"].get("sharpness_matrix")
            if not sharp:
                continue
            t = len(mat)
            for i in range(t - 1):
                rows.append({"policy": policy, "task": i, "sharpness after learning it": sharp[i][i],
                             "forgetting (pp)": 100 * (max(mat[k][i] for k in range(i, t - 1)) - mat[t - 1][i])})
    if rows:
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        sns.scatterplot(data=pd.DataFrame(rows), x="sharpness after learning it", y="forgetting (pp)",
                        hue="policy", hue_order=policies, palette=palette, ax=ax)
        ax.set_xscale("log")
        ax.set_title("Top Hessian eigenvalue of each task's solution\nagainst its forgetting", fontsize=10)
        save(fig, "sharpness-vs-forgetting")

    return [f"![{name}]({path})" for name, path in files] + [""]
