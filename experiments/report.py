"""The forgetting analysis: every finished run under a folder, as a markdown
report with seaborn figures.

For each benchmark, preset and strategy it gives a table of ACC, BWT,
forgetting and learning accuracy (mean ± std over seeds, with the number of
seeds) for every optimizer and boundary policy; each one's paired difference
to Adam over the seeds they share, with a 95% confidence interval (Student t);
the published anchors whose protocol matches; and figures: accuracy-matrix
heatmaps, per-task accuracy curves, forgetting bars, an ACC-against-forgetting
scatter, buffer statistics across experiences, the distance travelled in
parameter space against forgetting and, where recorded, sharpness against
forgetting.

When several arms are compared with one reference arm (``--reference``, Adam
by default), each paired difference also carries a paired t-test p-value,
Holm-adjusted over the arms of the section (Holm 1979, "A Simple Sequentially
Rejective Multiple Test Procedure"), and the report says which differences
survive at the 5 % level. Settings chosen by ``cl-cm tune`` (recorded in each
run's config.json) are shown per row and do not split rows.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import config as C
from .io import read_json, write_text

METRICS = (("acc", "ACC (%)", 100), ("bwt", "BWT (pp)", 100), ("forgetting", "forgetting (pp)", 100),
           ("learning_accuracy", "LA (%)", 100))
#: class-incremental runs also record ACC with the task given (metrics.json "task_il"), compared like the others;
#: a dotted key is a path into metrics.json
TASK_IL = ("task_il.acc", "task-IL ACC (%)", 100)
ANCHORS = Path(__file__).parent / "anchors.toml"
BASELINE = "adam"

# (term, the pattern that shows the report uses it, definition): the report's glossary lists every term
# its text or figures use
GLOSSARY = (
    ("ACC", r"\bACC\b", "average accuracy: the mean over all experiences of the accuracy on each at the end "
     "of training (%)"),
    ("BWT", r"\bBWT\b", "backward transfer: the mean over experiences but the last of the final accuracy "
     "minus the accuracy right after learning that experience (pp; negative when learning later "
     "experiences hurts earlier ones)"),
    ("forgetting (FGT)", r"\bforgetting\b", "the mean over experiences but the last of the best accuracy "
     "reached on it before the end minus its final accuracy (pp; Chaudhry et al. 2018)"),
    ("LA", r"\bLA\b", "learning accuracy: the mean over experiences of the accuracy on each right after "
     "learning it (%)"),
    ("task-IL ACC", r"task-IL", "ACC of the same model evaluated task-incrementally: the task of each test "
     "sample is given and only its classes' outputs compete"),
    ("pp", r"\(pp\)|\bpp\b", "percentage points, the unit of a difference of two accuracies in %"),
    ("n", r"\bn=|\bn\b", "number of seeds (independent runs) a mean is taken over"),
    ("CI", r"\bCI\b|confidence interval", "95% Student-t confidence interval of a mean paired difference "
     "over seeds"),
    ("p, Holm", r"Holm", "paired t-test p-value, adjusted over the arms of a table by Holm's step-down method "
     "(Holm 1979); a difference survives when the adjusted p < 0.05"),
    ("arm", r"\barm\b", "one optimizer with one boundary policy and one setting of its hyperparameters, "
     "run over several seeds; labelled optimizer/policy followed by the settings that differ from the "
     "defaults"),
    ("adam_cm, adam_cg, adam_sam, adam_cm_sam", r"adam_c[mg]|adam_sam", "Adam with critical momenta "
     "(Malviya et al. 2024), Adam with critical gradients (McRae et al. 2022), Adam with sharpness-aware "
     "minimisation, and Adam+CM with SAM"),
    ("keep, reset, decay f, shrink f", r"/(keep|reset|decay|shrink)", "what happens to the buffer at each "
     "boundary between experiences: carried over, emptied, its entries and priorities multiplied by f, "
     "or its capacity multiplied by f (docs/avalanche.md)"),
    ("+resetm", r"\+resetm", "Adam's moments m, v and step count set to zero at each boundary"),
    ("B, m", r"mean\(B\)|‖m‖", "the buffer of stored (critical) momenta and Adam's first moment; exploration "
     "is ‖mean(B)‖ / ‖m‖"),
    ("priority", r"priority", "the gradient norm ‖g‖₂ of the step whose momentum is stored, multiplied by the "
     "decay λ at every later step; the lowest-priority entry is replaced first"),
    ("θ, ‖·‖₂", r"θ", "the model's parameters and the Euclidean norm; ‖θ_k − θ_{k−1}‖₂ is the distance "
     "travelled while learning experience k"),
    ("λmax", r"λmax|Hessian eigenvalue", "the Hessian eigenvalue of largest magnitude of the training loss "
     "(sharpness), by power iteration on Hessian-vector products"),
    ("escape ratio", r"escape", "toy landscapes: the share of starts whose run ends in the basin of a "
     "different minimum at least as low as the one it started in"),
    ("s", r"\(s = |width s", "toy sharp_wide landscape: the width of the sharp minimum (smaller is sharper)"),
    ("perplexity", r"perplexity", "exp of the mean cross-entropy per token (lower is better)"),
)


def glossary(text: str) -> list[str]:
    """The report's glossary: every term of ``GLOSSARY`` that ``text`` uses."""
    import re

    used = [(term, meaning) for term, pattern, meaning in GLOSSARY if re.search(pattern, text)]
    if not used:
        return []
    return ["## Glossary", ""] + [f"- **{term}**: {meaning}." for term, meaning in used] + [""]


def load_runs(folder: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[dict[str, Any]]:
    """Every complete run (metrics.json and config.json) under ``folder``. A
    run whose files cannot be read or do not hold what a report needs is left
    out with a warning naming its file, and appended to ``skipped`` as (file,
    reason)."""
    import sys

    runs = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        cfg_path = path.parent / "config.json"
        if not cfg_path.exists():
            problem: tuple[Path, str] | None = (path, "no config.json beside it")
        else:
            run, problem = _read_run(path, cfg_path)
            if run is not None:
                runs.append(run)
        if problem is not None:
            print(f"cl-cm: warning: skipped {problem[0]}: {problem[1]}", file=sys.stderr)
            if skipped is not None:
                skipped.append(problem)
    return runs


def _read_run(path: Path, cfg_path: Path):
    """(run, None), or (None, (file, reason)) for a run that cannot be reported."""
    record = {}
    for file in (path, cfg_path):
        try:
            record[file] = read_json(file)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return None, (file, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if not isinstance(record[file], dict):
            return None, (file, f"holds a {type(record[file]).__name__}, not a table")
    metrics, saved = record[path], record[cfg_path]
    if not isinstance(saved.get("config"), dict):
        return None, (cfg_path, "has no \"config\" table")
    try:
        kind = metrics.get("kind", "cl")
        check = {"cl": _check_continual, "supervised": _check_supervised, "toy": _check_toy}.get(kind)
        if check is None:
            raise _Malformed(path, f"unknown kind {kind!r}")
        check(saved["config"], metrics, path, cfg_path)
    except _Malformed as e:
        return None, (e.file, e.reason)
    return {"folder": path.parent, "metrics": metrics, **saved}, None


class _Malformed(Exception):
    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(reason)
        self.file, self.reason = file, reason


def _is_number(x, none: bool = False) -> bool:
    if x is None:
        return none
    return C.is_number(x)


def _need(table: dict, key: str, test, what: str, file: Path) -> Any:
    value = table.get(key)
    if not test(value):
        raise _Malformed(file, f"{key} must be {what}, got {value!r}"[:200])
    return value


def _numbers(values, n: int | None = None, none: bool = False) -> bool:
    return (isinstance(values, list) and (n is None or len(values) == n)
            and all(_is_number(v, none) for v in values))


def _matrix(values, none: bool = False) -> bool:
    return (isinstance(values, list) and len(values) > 0
            and all(_numbers(row, len(values), none) for row in values))


def _settings_of(cls, cfg: dict, valid, file: Path) -> None:
    """The settings of a saved config, checked as the command line checks them."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        C.check_values(cls(**{k: v for k, v in cfg.items() if k in names}), valid)
    except C.ConfigError as e:
        raise _Malformed(file, str(e)) from None


def _check_continual(cfg: dict, m: dict, path: Path, cfg_path: Path) -> None:
    _settings_of(C.RunConfig, cfg, None, cfg_path)
    for key in ("benchmark", "preset", "strategy", "optimizer", *C.PROTOCOL_FIELDS):
        if cfg.get(key) is None and key != "augment":
            raise _Malformed(cfg_path, f"has no {key}")
    if not isinstance(cfg.get("provenance", {}), dict):
        raise _Malformed(cfg_path, "provenance must be a table")
    r = _need(m, "accuracy_matrix", _matrix, "a square table of numbers", path)
    _need(m, "acc", _is_number, "a number", path)
    for key in ("bwt", "forgetting", "learning_accuracy"):
        _need(m, key, lambda v: _is_number(v, none=True), "a number or null", path)
    _need(m, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", path)
    _need(m, "scenario", lambda v: isinstance(v, str), "a text", path)
    if "task_il" in m:
        ti = _need(m, "task_il", lambda v: isinstance(v, dict), "a table", path)
        _need(ti, "accuracy_matrix", _matrix, "a square table of numbers", path)
        _need(ti, "acc", _is_number, "a number", path)
    if "sharpness_matrix" in m:
        _need(m, "sharpness_matrix", lambda v: _matrix(v, none=True) and len(v) == len(r),
              "a square table of numbers, as large as the accuracy matrix", path)
    for key in ("distance_per_experience", "distance_from_init"):
        if m.get(key) is not None:
            _need(m, key, lambda v: _numbers(v, none=True), "a list of numbers", path)
    if "buffer_stats" in m:
        stats = _need(m, "buffer_stats", lambda v: isinstance(v, dict), "a table", path)
        _need(stats, "per_experience", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and _numbers(x, none=True) for k, x in v.items()), "a table of lists of numbers", path)


def _check_supervised(cfg: dict, m: dict, path: Path, cfg_path: Path) -> None:
    from .supervised import IMAGE_PROTOCOL, LM_PROTOCOL, VALID, SupervisedConfig

    _settings_of(SupervisedConfig, cfg, VALID, cfg_path)
    lm = cfg.get("task") == "ptb"
    for key in ("task", "preset", *(LM_PROTOCOL if lm else IMAGE_PROTOCOL)):
        if key not in cfg:
            raise _Malformed(cfg_path, f"has no {key}")
    _need(m, "label", lambda v: isinstance(v, str), "a text", path)
    _need(m, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", path)
    _need(m, "train_seconds", _is_number, "a number", path)
    score = "valid_ppl" if lm else "test_accuracy"
    _need(m, "history", lambda v: isinstance(v, list) and v and all(
        isinstance(h, dict) and _is_number(h.get("epoch")) and _is_number(h.get(score)) for h in v),
        f"a list of epochs, each with epoch and {score}", path)
    for key in (("valid_ppl", "test_ppl") if lm else ("test_accuracy",)):
        _need(m, key, _is_number, "a number", path)
    if not lm:
        _need(m, "top_hessian_eigenvalue", lambda v: _is_number(v, none=True), "a number or null", path)
    _need(m, "buffer_series", lambda v: v is None or (isinstance(v, list) and all(
        isinstance(p, dict) and _is_number(p.get("iteration")) for p in v)), "a list of records", path)


def _check_toy(cfg: dict, m: dict, path: Path, cfg_path: Path) -> None:
    from .toy import LANDSCAPES, ToyConfig

    _need(cfg, "landscape", lambda v: v in LANDSCAPES, f"one of {', '.join(LANDSCAPES)}", cfg_path)
    _need(cfg, "sharpness", _is_number, "a number", cfg_path)
    inner = _need(m, "config", lambda v: isinstance(v, dict) and set(v) <= {f.name for f in
                                                                           dataclasses.fields(ToyConfig)},
                  "a table of toy settings", path)
    _need(inner, "landscape", lambda v: v in LANDSCAPES, f"one of {', '.join(LANDSCAPES)}", path)
    _need(inner, "sharpness", _is_number, "a number", path)
    _need(inner, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", path)
    names = _need(inner, "optimizers", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
                  "a list of optimizer names", path)
    points = _need(m, "starts", lambda v: isinstance(v, list) and v and all(_numbers(p, 2) for p in v),
                   "a list of points", path)
    results = _need(m, "results", lambda v: isinstance(v, dict) and set(names) <= set(v), "a table per optimizer",
                    path)
    for name in names:
        res = results[name]
        ok = (isinstance(res, dict) and all(_is_number(res.get(k)) for k in ("escape_ratio", "mean_final_loss",
                                                                            "mean_travelled"))
              and isinstance(res.get("escaped"), list) and len(res["escaped"]) == len(points)
              and isinstance(res.get("trajectories"), list)
              and all(isinstance(t, list) and t and all(_numbers(p, 2) for p in t) for t in res["trajectories"]))
        if not ok:
            raise _Malformed(path, f"results of {name!r} are incomplete")


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
    options = optimizer_options(cfg["optimizer"])
    settings.update({k: v for k, v in options.items() if cfg.get(k) is None})
    if "betas" in options:
        for i, name in enumerate(("beta1", "beta2")):
            if cfg.get(name) is None:
                settings[name] = options["betas"][i]
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


def tuned_keys(run: dict[str, Any]) -> tuple[str, ...]:
    """Settings of a run that ``cl-cm tune`` chose (from its config.json)."""
    return tuple(k for k, v in run.get("provenance", {}).items() if str(v).startswith("tuned"))


def _group_runs(runs):
    """{(benchmark, preset, strategy, protocol): {row label: [runs]}}; a row is
    one optimizer, policy and explicit hyperparameter setting, over seeds
    (values chosen by cl-cm tune do not split rows: each arm has its own)."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cfg = run["config"]
        label = C.run_label(C.RunConfig(**{k: v for k, v in cfg.items() if k in C.FIELD_NAMES}),
                            exclude=tuned_keys(run))
        protocol = tuple(cfg.get(k) for k in C.PROTOCOL_FIELDS) + (run["metrics"].get("eval_split", "test"),)
        bench = C.bench_label({"benchmark": cfg["benchmark"], "scenario": cfg.get("scenario")})
        groups[(bench, cfg["preset"], cfg["strategy"], protocol)][label].append(run)
    return groups


def _policy_order(policies, reference: str = BASELINE):
    head, first = reference.split(" ")[0], _reference_label(policies, reference)
    return sorted(policies, key=lambda p: (p != first, not p.startswith(head + " ") and p != head, p))


def _baseline_for(label: str, by_policy, reference: str = BASELINE) -> str | None:
    """The reference row that ``label`` is compared with: the one labelled
    ``reference`` when the arms' learning rates were tuned (each arm at its
    best); otherwise the reference optimizer's row with the same learning
    rate as ``label``'s run, falling back to the one labelled ``reference``.
    A setting that every arm of the section shares (a strategy's, e.g.
    ``ewc_lambda=100``) is part of every label, the reference's included."""
    run = by_policy[label][0]
    if "lr" not in tuned_keys(run):
        lr = effective_settings(run["config"])["lr"]
        head = reference.split(" ")[0]
        for candidate in _policy_order(by_policy, reference):
            if (candidate.split(" ")[0] == head and "lr" not in tuned_keys(by_policy[candidate][0])
                    and effective_settings(by_policy[candidate][0]["config"])["lr"] == lr):
                return candidate
    return _reference_label(by_policy, reference)


def _reference_label(labels, reference: str = BASELINE) -> str | None:
    """Among the row ``labels``, that of ``reference``: labelled so, or so plus
    settings that every label shares."""
    labels = sorted(labels)
    if reference in labels:
        return reference
    shared = set.intersection(*(set(p.split(" ")[1:]) for p in labels)) if labels else set()
    extra = set(reference.split(" ")[1:])
    return next((p for p in labels if p.split(" ")[0] == reference.split(" ")[0]
                 and set(p.split(" ")[1:]) - extra <= shared), None)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and
    is not counted): adjusted p_(i) = max_{j <= i} min(1, (m − j + 1) p_(j))
    over the p-values in increasing order."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def paired_p(diffs: list[float]) -> float:
    """Two-sided paired t-test p-value of differences (NaN for fewer than 2, or
    all equal: no spread to test against)."""
    from scipy import stats

    x = np.asarray(diffs, dtype=float)
    if len(x) < 2 or np.allclose(x, x[0]):
        return 0.0 if len(x) >= 2 and x[0] != 0 and np.allclose(x, x[0]) else math.nan
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def render(folder: str | Path, out: str | Path | None = None, reference: str = BASELINE) -> Path:
    """Write ``report.md`` and its figures; return the report's path.
    ``reference`` labels the arm every other arm is compared with."""
    folder = Path(folder)
    out = Path(out) if out else folder / "report"
    for path in (out, out / "figures"):
        if path.is_symlink():
            raise C.ConfigError(f"{path} is a symbolic link; the report would be written elsewhere: delete it or "
                                "give --out")
    skipped: list[tuple[Path, str]] = []
    runs = load_runs(folder, skipped)
    if not runs:  # nothing to report: nothing written
        unread = f" ({len(skipped)} could not be read, see the warnings above)" if skipped else ""
        raise C.ConfigError(f"no finished run under {folder}{unread}: a run is finished when its folder holds "
                            "metrics.json; no report written")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for path in (out / "figures").iterdir():
        if path.is_symlink():  # a figure is never written through a link
            path.unlink()
    lines = ["# Report", "",
             f"{len(runs)} finished run(s) under `{folder}`. "
             + ("Accuracies in %, differences of accuracies in percentage points (pp); mean ± std over seeds, "
                f"n = number of seeds. Differences to the reference arm `{reference}` are paired by seed. "
                if any(r["metrics"].get("kind", "cl") != "toy" for r in runs) else "")
             + "Abbreviations are defined in the glossary at the end.", ""]
    if skipped:
        lines += [f"Skipped {len(skipped)} run(s) whose files could not be used:", ""]
        lines += [f"- `{_relative(file, folder)}`: {reason}" for file, reason in skipped] + [""]
    skipped_steps = [r for r in runs if r["metrics"].get("skipped_steps")]
    if skipped_steps:
        lines += [f"{len(skipped_steps)} run(s) skipped optimizer steps for NaN/Inf gradients:", ""]
        lines += [f"- `{_relative(r['folder'], folder)}`: {r['metrics']['skipped_steps']} step(s)"
                  for r in skipped_steps] + [""]
    kinds = defaultdict(list)
    for run in runs:
        kinds[run["metrics"].get("kind", "cl")].append(run)
    runs = kinds["cl"]
    if kinds["supervised"]:
        lines += _supervised_sections(kinds["supervised"], out)
    if kinds["toy"]:
        lines += _toy_sections(kinds["toy"], out)
    groups = _group_runs(runs)
    for index, ((bench, preset, strategy, _), by_policy) in enumerate(sorted(groups.items(), key=str)):
        same = sum(1 for (b, p, s, _) in groups if (b, p, s) == (bench, preset, strategy))
        lines += _section(bench, preset, strategy, by_policy, out, suffix=f"-{index}" if same > 1 else "",
                          reference=reference)
    lines += glossary("\n".join(lines))
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    """A figure's file name from values read from results (no path separators, no ``..``)."""
    from .tuning import slug

    return slug(text)


def _section(bench, preset, strategy, by_policy, out: Path, suffix: str = "", reference: str = BASELINE) -> list[str]:
    first = next(iter(by_policy.values()))[0]
    cfg, m0 = first["config"], first["metrics"]
    slug = _slug(f"{bench}-{preset}-{strategy}{suffix}")
    split = m0.get("eval_split", "test")
    lines = [f"## {bench}, preset `{preset}`, strategy `{strategy}`"
             + (" (VALIDATION data: tuning runs, not test results)" if split != "test" else ""), "",
             f"*Scenario:* {m0['scenario']}. *Protocol:* {first.get('protocol', '')}.", "",
             f"*Settings:* {cfg['n_experiences']} experiences, {cfg['epochs']} epoch(s) each, batch "
             f"{cfg['batch_size']}, model {cfg['model']} (width {cfg['width']}), "
             f"{'all' if not cfg['train_per_class'] else cfg['train_per_class']} training samples per class; "
             "optimizer settings per row below (defaults of `strategies.make_optimizer` unless given).", ""]
    policies = _policy_order(by_policy, reference)
    metrics = compared_metrics(by_policy)
    header = ["optimizer / policy", "n", "lr", "tuned", "seeds"] + [label for _, label, _ in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    anchors_found = []
    for policy in policies:
        rs = by_policy[policy]
        settings = effective_settings(rs[0]["config"])
        tuned = sorted({k for r in rs for k in tuned_keys(r)})
        cells = [f"`{policy}`", str(len(rs)), _values(rs, "lr"),
                 ", ".join(f"{k}={_values(rs, k)}" for k in tuned) if tuned else "-",
                 ",".join(str(r["metrics"]["seed"]) for r in rs)]
        for key, _, scale in metrics:
            vals = [scale * _value(r["metrics"], key) for r in rs if _value(r["metrics"], key) is not None]
            cells.append(_fmt(np.mean(vals) if vals else math.nan, np.std(vals, ddof=1) if len(vals) > 1 else math.nan))
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
    lines += _paired(by_policy, policies, reference)
    lines += _mechanism(by_policy, policies)
    lines += _figures(slug, by_policy, policies, out)
    return lines


def _mechanism(by_policy, policies) -> list[str]:
    """Per arm, the quantities of the wide-minima view of forgetting (Mirzadeh
    et al. 2020): the distance travelled per experience and from the
    initialisation, and where recorded λmax of each task right after learning
    it; then the rank correlation of each with forgetting over the arms."""
    from scipy.stats import spearmanr

    def per_run(r):
        m = r["metrics"]
        steps, init = m.get("distance_per_experience"), m.get("distance_from_init")
        sharp = m.get("sharpness_matrix")
        diagonal = [row[k] for k, row in enumerate(sharp) if row[k] is not None] if sharp else []
        return (float(np.mean(steps)) if steps else math.nan, init[-1] if init else math.nan,
                float(np.mean(diagonal)) if diagonal else math.nan, 100 * m["forgetting"])

    table = {p: np.array([per_run(r) for r in by_policy[p]], dtype=float) for p in policies}
    columns = [(0, "mean ‖θ_k − θ_{k−1}‖₂"), (1, "‖θ_end − θ_0‖₂"), (2, "mean λmax after learning")]
    columns = [(i, name) for i, name in columns if any(np.isfinite(t[:, i]).any() for t in table.values())]
    if not columns:
        return []
    lines = ["Mechanism, per arm (mean ± std over seeds): the distance the parameters travel while learning "
             "an experience (mean over experiences), their distance from the initialisation at the end"
             + (", and λmax, the top Hessian eigenvalue of each task's loss right after learning it (mean over "
                "tasks)" if any(i == 2 for i, _ in columns) else "") + ".", "",
             "| optimizer / policy | n | " + " | ".join(name for _, name in columns) + " | forgetting (pp) |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for p in policies:
        t = table[p]
        cells = [_fmt(np.nanmean(t[:, i]), np.nanstd(t[:, i], ddof=1) if len(t) > 1 else math.nan) for i, _ in columns]
        lines.append(f"| `{p}` | {len(t)} | " + " | ".join(cells) + f" | {_fmt(t[:, 3].mean(), t[:, 3].std(ddof=1) if len(t) > 1 else math.nan)} |")
    lines.append("")
    if len(policies) >= 4:
        for i, name in columns:
            means = [(np.nanmean(table[p][:, i]), table[p][:, 3].mean()) for p in policies
                     if np.isfinite(table[p][:, i]).any()]
            if len(means) >= 4:
                xs, ys = [a for a, _ in means], [b for _, b in means]
                if len(set(xs)) == 1 or len(set(ys)) == 1:  # a rank correlation with a constant is undefined
                    lines.append(f"- {name} against forgetting over the {len(means)} arms' means: no rank "
                                 "correlation, one of them is the same for every arm.")
                    continue
                rho, pval = spearmanr(xs, ys)
                lines.append(f"- {name} against forgetting over the {len(means)} arms' means: Spearman ρ = "
                             f"{rho:+.2f} (p = {pval:.3g}).")
        lines.append("")
    return lines


def _values(rs, key: str) -> str:
    """The value of a setting over a row's runs (one value, or the distinct ones)."""
    values = sorted({str(effective_settings(r["config"]).get(key, "")) for r in rs})
    return values[0] if len(values) == 1 else "/".join(values)


def compared_metrics(by_policy) -> tuple[tuple[str, str, int], ...]:
    """The metrics compared between arms: :data:`METRICS`, and task-IL ACC when every run has it."""
    every = all("task_il" in r["metrics"] for rs in by_policy.values() for r in rs)
    return METRICS + ((TASK_IL,) if every else ())


def _value(m: dict[str, Any], key: str):
    """The metric ``key`` of metrics.json ``m``; a dotted key is a path ("task_il.acc")."""
    for part in key.split("."):
        m = m[part]
    return m


def paired_differences(by_policy, policies, reference: str = BASELINE, metrics=None) -> list[dict[str, Any]]:
    """Per arm other than the reference: its reference row, the pairs, and for
    each metric (:func:`compared_metrics`) the mean difference, the 95% CI
    half-width, the paired t-test p-value and its Holm adjustment over the
    arms (one family per metric)."""
    metrics = metrics or compared_metrics(by_policy)
    rows = []
    for policy in policies:
        baseline = _baseline_for(policy, by_policy, reference)
        if policy == baseline or (baseline is None and policy.split(" ")[0] == reference.split(" ")[0]):
            continue
        row: dict[str, Any] = {"policy": policy, "baseline": baseline, "pairs": 0, "metrics": {}}
        if baseline is not None:
            base = {r["metrics"]["seed"]: r["metrics"] for r in by_policy[baseline]}
            pairs = [(r["metrics"], base[r["metrics"]["seed"]]) for r in by_policy[policy]
                     if r["metrics"]["seed"] in base]
            row["pairs"] = len(pairs)
            for key, _, scale in metrics:
                diffs = [scale * (_value(a, key) - _value(b, key)) for a, b in pairs
                         if _value(a, key) is not None and _value(b, key) is not None]
                mean, half = t_interval(diffs) if diffs else (math.nan, math.nan)
                row["metrics"][key] = {"mean": mean, "half": half, "n": len(diffs),
                                       "p": paired_p(diffs) if diffs else math.nan}
        rows.append(row)
    for key, _, _ in metrics:
        with_key = [r for r in rows if key in r["metrics"]]
        for r, adjusted in zip(with_key, holm([r["metrics"][key]["p"] for r in with_key])):
            r["metrics"][key]["p_holm"] = adjusted
    return rows


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _paired(by_policy, policies, reference: str = BASELINE) -> list[str]:
    metrics = compared_metrics(by_policy)
    rows = paired_differences(by_policy, policies, reference, metrics)
    if not rows:
        return []
    lines = [f"Paired difference to the reference arm `{reference}` (same seeds; untuned rows against the "
             "reference at the same learning rate), mean, 95% CI and Holm-adjusted p-value (over the "
             f"{len(rows)} arms of this table):", "",
             "| optimizer / policy | against | pairs | " + " | ".join(f"Δ {label}" for _, label, _ in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    verdicts = []
    for row in rows:
        if row["baseline"] is None:
            lines.append(f"| `{row['policy']}` | no reference run with this lr | 0 |" + " n/a |" * len(metrics))
            continue
        cells = [f"`{row['policy']}`", f"`{row['baseline']}`", str(row["pairs"])]
        for key, _, _ in metrics:
            d = row["metrics"][key]
            mean, half = d["mean"], d["half"]
            if math.isnan(mean):
                cells.append("n/a")
            elif math.isnan(half):
                cells.append(f"{mean:+.2f} (CI needs 2 seeds)")
            else:
                cells.append(f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] p={_p_text(d['p_holm'])}")
        lines.append("| " + " | ".join(cells) + " |")
        acc = row["metrics"]["acc"]
        if not math.isnan(acc["mean"]):
            verdicts.append(_verdict(row["policy"], acc["mean"], acc["half"], acc["n"], acc["p_holm"],
                                     row["baseline"]))
    return lines + ["", "ACC against the reference (Holm-adjusted over the arms, 5% level):", ""] + verdicts + [""]


def _verdict(policy: str, mean: float, half: float, n: int, p_holm: float = math.nan,
             baseline: str = BASELINE) -> str:
    if math.isnan(half):
        return f"- `{policy}`: ACC {mean:+.2f} pp against `{baseline}` from {n} seed; no interval with one seed."
    lo, hi = mean - half, mean + half
    survives = not math.isnan(p_holm) and p_holm < 0.05
    if survives and mean > 0:
        word = f"higher than `{baseline}`'s; survives the Holm adjustment (p = {_p_text(p_holm)})"
    elif survives and mean < 0:
        word = f"lower than `{baseline}`'s; survives the Holm adjustment (p = {_p_text(p_holm)})"
    else:
        word = (f"not distinguishable from `{baseline}`'s after the Holm adjustment (p = {_p_text(p_holm)}"
                + ("; the unadjusted 95% interval excludes zero)" if lo > 0 or hi < 0 else ")"))
    return f"- `{policy}`: ACC {mean:+.2f} pp [{lo:+.2f}, {hi:+.2f}] over {n} seeds, {word}."


# ------------------------------------------------------------------- figures
TICK_SIZE = 9  # points; tick labels stay readable once a wide figure is scaled to a page
MARKERS = "osD^vP*XhpH<>d"
TASK_LEGEND_MAX = 10  # up to this many tasks each gets a legend entry; more share a colour bar

BUFFER_STATS = {  # statistic: (panel title, y-axis label); definitions in cl_cm.AdamCM.buffer_stats
    "size": ("buffer size", "stored entries"),
    "capacity": ("buffer capacity", "slots"),
    "mean_priority": ("mean priority of stored entries", "priority (decayed ‖g‖₂)"),
    "replacement_rate": ("replacement rate", "share of full-buffer steps"),
    "exploration": ("exploration ‖mean(B)‖ / ‖m‖", "ratio"),
    "cosine_similarity": ("cosine of stored entries", "mean pairwise cosine"),
}


BUFFER_MEANING = {
    "size": "size, the number of stored momenta",
    "capacity": "capacity, the number of slots",
    "mean_priority": "mean priority, the decayed gradient norm ‖g‖₂ of the stored steps",
    "replacement_rate": "replacement rate, the share of steps with a full buffer whose momentum replaced a "
                        "stored one",
    "exploration": "exploration ‖mean(B)‖/‖m‖, the buffer term's size relative to Adam's momentum",
    "cosine_similarity": "the mean pairwise cosine of the stored entries (gradient cancellation: low means "
                         "they cancel)",
}


def _wrap(label: str) -> str:
    """Row labels on figures: one setting per line."""
    return label.replace(" ", "\n")


def _theme() -> None:
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook",
                  rc={"xtick.labelsize": TICK_SIZE, "ytick.labelsize": TICK_SIZE, "axes.labelsize": 10,
                      "axes.titlesize": 10, "legend.fontsize": TICK_SIZE, "legend.title_fontsize": 10,
                      "figure.titlesize": 11, "figure.labelsize": 10})


def arm_styles(labels) -> dict[str, dict[str, Any]]:
    """A colour and a marker per arm, the same in every figure of a section:
    distinct colours (tab10 up to 10 arms, tab20 up to 20, evenly spaced hues
    beyond) and markers that differ between neighbouring arms."""
    import seaborn as sns

    labels = list(labels)
    n = len(labels)
    colors = sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)
    return {lab: {"color": tuple(colors[i]), "marker": MARKERS[i % len(MARKERS)]} for i, lab in enumerate(labels)}


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _is_constant(values) -> bool:
    """True when there are several finite values and all are the same (a plot
    of them shows one level)."""
    values = _finite(values)
    return len(values) > 1 and max(values) - min(values) <= 1e-12 * max(1.0, abs(values[0]))


def _arm_legend(fig, styles, labels, title="arm", line=False) -> None:
    """One legend for the whole figure, outside on the right, one entry per arm."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[lab]["color"], marker=styles[lab]["marker"], markersize=6,
                      linestyle="-" if line else "none", markeredgecolor="black", markeredgewidth=0.4)
               for lab in labels]
    fig.legend(handles, list(labels), title=title, loc="outside right upper", frameon=False)


def _caption(text: str) -> str:
    return f"*{text}*"


def _pyplot():
    """matplotlib's pyplot without a display, in the report's theme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _theme()
    return plt


def _saver(out: Path, slug: str, lines: list[str]):
    """``save(fig, name, caption)``: writes ``figures/<slug>-<name>.png``
    under ``out`` and appends its markdown and caption to ``lines``."""
    def save(fig, name, caption):
        import matplotlib.pyplot as plt

        path = out / "figures" / f"{slug}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        lines.extend([f"![{name}]({path.relative_to(out)})", "", _caption(caption), ""])

    return save


def _figures(slug: str, by_policy, policies, out: Path) -> list[str]:
    """The section's figures, each followed in the markdown by a caption."""
    plt = _pyplot()
    styles = arm_styles(policies)
    lines: list[str] = []
    save = _saver(out, slug, lines)

    n = len(policies)
    mats = {p: np.array([r["metrics"]["accuracy_matrix"] for r in by_policy[p]], dtype=float) * 100
            for p in policies}
    t = next(iter(mats.values())).shape[1]
    step = 1 if t <= 10 else math.ceil(t / 10)
    ticks = list(range(0, t, step))

    # accuracy matrices, one shared colour bar
    cols = min(n, 3)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols + 1.4, 3.1 * rows_ + 0.8), squeeze=False,
                             layout="constrained", sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, policy in zip(axes.flat, policies):
        mean = mats[policy].mean(0)
        image = ax.imshow(mean, vmin=0, vmax=100, cmap="viridis", aspect="equal")
        ax.grid(False)
        if t <= 10:
            for i in range(t):
                for j in range(t):
                    ax.text(j, i, f"{mean[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if mean[i, j] > 60 else "white")
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_title(f"{_wrap(policy)} (n={len(mats[policy])})", fontsize=9)
    fig.colorbar(image, ax=[ax for ax in axes.flat[:n]], label="accuracy (%)",
                 shrink=min(0.8, 3 / rows_ + 0.2))
    fig.supxlabel("experience evaluated")
    fig.supylabel("after training on experience")
    fig.suptitle("Accuracy matrix (%), mean over n seeds")
    save(fig, "accuracy-matrix", "Accuracy matrix: row k, column i is the accuracy (%) on experience i after "
         "training on experience k (experiences numbered from 0), mean over the n seeds of each arm; "
         "the lower triangle and diagonal are what ACC, BWT, forgetting and LA are computed from.")

    # per-task accuracy curves
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols + 1.6, 2.7 * rows_ + 0.8), squeeze=False,
                             layout="constrained", sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    if t <= TASK_LEGEND_MAX:
        import seaborn as sns

        task_colors = [tuple(c) for c in sns.color_palette("tab10", t)]
    else:
        cmap = plt.colormaps["viridis"]
        task_colors = [cmap(i / (t - 1)) for i in range(t)]
    for ax, policy in zip(axes.flat, policies):
        m = mats[policy]
        for i in range(t):
            ks = np.arange(i, t)
            mean, sd = m[:, i:, i].mean(0), m[:, i:, i].std(0, ddof=1) if len(m) > 1 else None
            ax.plot(ks, mean, color=task_colors[i], marker="o", markersize=3 if t > 10 else 4, lw=1.3,
                    label=f"task {i}")
            if sd is not None:
                ax.fill_between(ks, mean - sd, mean + sd, color=task_colors[i], alpha=0.12, lw=0)
        ax.set_xticks(ticks)
        ax.set_title(f"{_wrap(policy)} (n={len(m)})", fontsize=9)
    if t <= TASK_LEGEND_MAX:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="task", loc="outside right upper", frameon=False)
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        from matplotlib.ticker import MaxNLocator

        bar = fig.colorbar(ScalarMappable(Normalize(0, t - 1), cmap), ax=[ax for ax in axes.flat[:n]],
                           shrink=min(0.8, 3 / rows_ + 0.2), ticks=MaxNLocator(integer=True))
        bar.set_label("task (the experience it is learned in)")
    fig.supxlabel("after training on experience")
    fig.supylabel("accuracy (%)")
    fig.suptitle("Accuracy on each task across training (mean ± sd over seeds)")
    save(fig, "task-curves", "Accuracy (%) on each task from the experience it is learned in to the end of "
         "training, one curve per task, mean (line) ± sd (band) over the n seeds of each arm.")

    # forgetting bars and ACC-forgetting scatter
    summary = {p: [(100 * r["metrics"]["acc"], 100 * (r["metrics"]["forgetting"] or 0.0)) for r in by_policy[p]]
               for p in policies}
    forgetting = [f for p in policies for _, f in summary[p]]
    if _is_constant(forgetting):
        lines += [f"Forgetting is {forgetting[0]:.2f} pp in every run; no forgetting figure.", ""]
    else:
        fig, ax = plt.subplots(figsize=(6.4, 0.36 * n + 1.4), layout="constrained")
        for y, policy in enumerate(policies):
            values = [f for _, f in summary[policy]]
            ax.barh(y, np.mean(values), xerr=np.std(values, ddof=1) if len(values) > 1 else None,
                    color=styles[policy]["color"], capsize=3, height=0.7)
            ax.scatter(values, [y] * len(values), color="black", s=8, zorder=3)
        ax.set_yticks(range(n), policies)
        ax.set_ylabel("arm")
        ax.invert_yaxis()
        ax.set_xlabel("forgetting (pp)")
        ax.set_title("Forgetting per arm (bar: mean ± sd over seeds, dots: seeds)")
        save(fig, "forgetting", "Forgetting (pp): for each experience, the best accuracy it had before the "
             "last one minus its final accuracy, averaged over all experiences but the last.")

    fig, ax = plt.subplots(figsize=(5.0 + (2.6 if n > 1 else 0), 3.8), layout="constrained")
    for policy in policies:
        acc, fgt = zip(*summary[policy])
        st = styles[policy]
        ax.scatter(fgt, acc, color=st["color"], marker=st["marker"], s=22, alpha=0.45, lw=0)
        ax.scatter(np.mean(fgt), np.mean(acc), color=st["color"], marker=st["marker"], s=110,
                   edgecolor="black", linewidth=0.7, zorder=3)
    ax.set_xlabel("forgetting (pp)")
    ax.set_ylabel("ACC (%)")
    ax.set_title("ACC against forgetting")
    _arm_legend(fig, styles, policies)
    save(fig, "acc-vs-forgetting", "Final average accuracy ACC (%) against forgetting (pp): small faint "
         "markers are seeds, large outlined markers the arm's mean.")

    # buffer statistics across experiences
    per_stat: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for policy in policies:
        for r in by_policy[policy]:
            for key, values in r["metrics"].get("buffer_stats", {}).get("per_experience", {}).items():
                per_stat[key][policy].append([np.nan if v is None else float(v) for v in values])
    notes, drawn = [], []
    for key in sorted(per_stat, key=lambda k: (list(BUFFER_STATS).index(k) if k in BUFFER_STATS else 99, k)):
        values = [v for series in per_stat[key].values() for s in series for v in s]
        if not _finite(values):
            continue
        if key == "capacity" and "size" in per_stat and all(
                np.array_equal(np.array(per_stat["size"].get(p), dtype=float), np.array(s, dtype=float),
                               equal_nan=True) for p, s in per_stat["capacity"].items()):
            notes.append("capacity equals size in every run (the buffer is always full)")
        elif _is_constant(values):
            notes.append(f"{key} is {_finite(values)[0]:g} in every run")
        else:
            drawn.append(key)
    if drawn:
        arms = [p for p in policies if any(p in per_stat[k] for k in drawn)]
        cols_ = 2 if len(drawn) == 4 else min(len(drawn), 3)
        fig, axes = plt.subplots(math.ceil(len(drawn) / cols_), cols_, squeeze=False, layout="constrained",
                                 figsize=(3.6 * cols_ + (2.6 if arms else 0), 2.9 * math.ceil(len(drawn) / cols_)
                                          + 0.6), sharex=True)
        for ax in axes.flat[len(drawn):]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, drawn):
            for policy in arms:
                series = per_stat[key].get(policy)
                if not series:
                    continue
                arr = np.array([s + [np.nan] * (t - len(s)) for s in series], dtype=float)[:, :t]
                with warnings.catch_warnings():  # an experience without a value in any seed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(arr, 0)
                    sd = np.nanstd(arr, 0, ddof=1) if len(arr) > 1 else None
                ks = np.arange(arr.shape[1])
                st = styles[policy]
                ax.plot(ks, mean, color=st["color"], marker=st["marker"], markersize=4, lw=1.3)
                if sd is not None:
                    ax.fill_between(ks, mean - sd, mean + sd, color=st["color"], alpha=0.12, lw=0)
            title, ylabel = BUFFER_STATS.get(key, (key, "value"))
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xticks(ticks)
        fig.supxlabel("experience (value at its end)")
        fig.suptitle("Buffer statistics at the end of each experience (mean ± sd over seeds)")
        _arm_legend(fig, styles, arms, line=True)
        save(fig, "buffer-stats", "Buffer statistics of the arms with a buffer, at the end of each experience "
             "(a gap: undefined there, e.g. an empty buffer): " + "; ".join(BUFFER_MEANING[k] for k in drawn if k in
                                                                       BUFFER_MEANING) + "."
             + (" Not drawn: " + "; ".join(notes) + "." if notes else ""))
    elif notes:
        lines += ["Buffer statistics: " + "; ".join(notes) + " (no figure).", ""]

    # distance travelled against forgetting (Mirzadeh et al. 2020)
    rows = []
    for policy in policies:
        for r in by_policy[policy]:
            m = r["metrics"]
            per_exp, init = m.get("distance_per_experience"), m.get("distance_from_init")
            if not per_exp or any(v is None for v in per_exp) or not init or init[-1] is None:
                continue
            rows.append((policy, 100 * (m["forgetting"] or 0.0), float(np.mean(per_exp)), float(init[-1])))
    if rows:
        arms = [p for p in policies if any(r[0] == p for r in rows)]
        fig, axes = plt.subplots(1, 2, figsize=(9.0 + 2.6, 3.8), sharey=True, layout="constrained")
        for ax, column, xlabel in zip(axes, (2, 3), ("mean ‖θ_k − θ_{k−1}‖₂ over experiences k",
                                                      "‖θ_end − θ_0‖₂ (distance from initialisation)")):
            for policy in arms:
                xs = [r[column] for r in rows if r[0] == policy]
                ys = [r[1] for r in rows if r[0] == policy]
                st = styles[policy]
                ax.scatter(xs, ys, color=st["color"], marker=st["marker"], s=22, alpha=0.45, lw=0)
                ax.scatter(np.mean(xs), np.mean(ys), color=st["color"], marker=st["marker"], s=110,
                           edgecolor="black", linewidth=0.7, zorder=3)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("forgetting (pp)")
        fig.suptitle("Distance travelled in parameter space against forgetting")
        _arm_legend(fig, styles, arms)
        save(fig, "distance-vs-forgetting", "Forgetting (pp) against the Euclidean distance the parameters θ "
             "travel (Mirzadeh et al. 2020): left, the distance moved while learning each experience, averaged "
             "over experiences; right, the distance from the initial parameters at the end. Small faint "
             "markers are seeds, large outlined markers the arm's mean.")

    # sharpness against forgetting
    rows = []
    for policy in policies:
        for r in by_policy[policy]:
            mat, sharp = r["metrics"]["accuracy_matrix"], r["metrics"].get("sharpness_matrix")
            if not sharp:
                continue
            for i in range(t - 1):
                if sharp[i][i] is not None:
                    rows.append((policy, sharp[i][i], 100 * (max(mat[k][i] for k in range(i, t - 1)) - mat[t - 1][i])))
    if rows:
        arms = [p for p in policies if any(r[0] == p for r in rows)]
        fig, ax = plt.subplots(figsize=(5.0 + 2.6, 3.8), layout="constrained")
        for policy in arms:
            st = styles[policy]
            ax.scatter([r[1] for r in rows if r[0] == policy], [r[2] for r in rows if r[0] == policy],
                       color=st["color"], marker=st["marker"], s=30, alpha=0.7, lw=0)
        log = all(r[1] > 0 for r in rows)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("λmax after learning the task" + (" (log scale)" if log else ""))
        ax.set_ylabel("forgetting of that task (pp)")
        ax.set_title("Sharpness of each task's solution against its forgetting")
        _arm_legend(fig, styles, arms)
        save(fig, "sharpness-vs-forgetting", "Each marker is one task of one seed: λmax, the top eigenvalue of "
             "the loss Hessian on that task right after learning it, against that task's forgetting (pp).")
    return lines


# ----------------------------------------------------------- supervised runs
def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return _fmt(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)


def _supervised_sections(runs, out: Path) -> list[str]:
    from .supervised import IMAGE_PROTOCOL, LM_PROTOCOL

    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cfg = run["config"]
        keys = LM_PROTOCOL if cfg["task"] == "ptb" else IMAGE_PROTOCOL
        groups[(cfg["task"], cfg["preset"], tuple(cfg[k] for k in keys))][run["metrics"]["label"]].append(run)
    lines = []
    for index, ((task, preset, _), by_label) in enumerate(sorted(groups.items(), key=str)):
        labels = _policy_order(by_label)
        first = by_label[labels[0]][0]
        lm = task == "ptb"
        lines += [f"## {task}, preset `{preset}` (supervised)", "", f"*Protocol:* {first.get('protocol', '')}.", ""]
        if lm:
            header = ["optimizer", "n", "lr", "seeds", "validation perplexity", "test perplexity", "seconds"]
        else:
            header = ["optimizer", "n", "lr", "seeds", "test accuracy (%)", "top Hessian eigenvalue", "seconds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lab in labels:
            rs = by_label[lab]
            ms = [r["metrics"] for r in rs]
            lr = effective_settings({**rs[0]["config"], "strategy": "naive"})["lr"]
            cells = [f"`{lab}`", str(len(rs)), f"{lr}", ",".join(str(m["seed"]) for m in ms)]
            if lm:
                cells += [_mean_sd([m["valid_ppl"] for m in ms]), _mean_sd([m["test_ppl"] for m in ms])]
            else:
                cells += [_mean_sd([100 * m["test_accuracy"] for m in ms]),
                          _mean_sd([m.get("top_hessian_eigenvalue") for m in ms])]
            cells.append(f"{np.mean([m['train_seconds'] for m in ms]):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        key, name, scale = ("valid_ppl", "validation perplexity", 1) if lm else ("test_accuracy", "test accuracy (pp)", 100)
        base = {r["metrics"]["seed"]: r["metrics"] for r in by_label.get(BASELINE, [])}
        if base:
            lines += [f"Paired difference to Adam in {name} (same seeds), mean and 95% CI"
                      + (" (lower perplexity is better):" if lm else ":"), ""]
            for lab in labels:
                if lab == BASELINE:
                    continue
                diffs = [scale * (r["metrics"][key] - base[r["metrics"]["seed"]][key]) for r in by_label[lab]
                         if r["metrics"]["seed"] in base]
                if diffs:
                    mean, half = t_interval(diffs)
                    ci = f"[{mean - half:+.2f}, {mean + half:+.2f}]" if not math.isnan(half) else "(one seed)"
                    lines.append(f"- `{lab}`: {mean:+.2f} {ci} over {len(diffs)} seeds")
            lines.append("")
        lines += _supervised_figures(_slug(f"{task}-{preset}-{index}"), by_label, labels, lm, out)
    return lines


def _supervised_figures(slug, by_label, labels, lm: bool, out: Path) -> list[str]:
    plt = _pyplot()
    styles = arm_styles(labels)
    lines: list[str] = []
    save = _saver(out, slug, lines)

    def curve(ax, label, points):
        """Mean ± sd over seeds of (x, y) points, one line for an optimizer."""
        by_x = defaultdict(list)
        for x, y in points:
            by_x[x].append(y)
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[x]) for x in xs])
        st = styles[label]
        ax.plot(xs, mean, color=st["color"], marker=st["marker"], markersize=4, lw=1.3)
        if any(len(by_x[x]) > 1 for x in xs):
            sd = np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs])
            ax.fill_between(xs, mean - sd, mean + sd, color=st["color"], alpha=0.15, lw=0)

    metric = "valid_ppl" if lm else "test_accuracy"
    ylabel = "validation perplexity" if lm else "test accuracy (%)"
    fig, ax = plt.subplots(figsize=(5.2 + 1.8, 3.6), layout="constrained")
    for lab in labels:
        curve(ax, lab, [(h["epoch"], h[metric] * (1 if lm else 100)) for r in by_label[lab]
                        for h in r["metrics"]["history"]])
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel[0].upper() + ylabel[1:]} during training")
    _arm_legend(fig, styles, labels, title="optimizer", line=True)
    save(fig, "curves", f"{ylabel[0].upper() + ylabel[1:]} after each epoch, mean (line) ± sd (band) over seeds.")
    if not lm:
        values = {lab: [r["metrics"]["top_hessian_eigenvalue"] for r in by_label[lab]
                        if r["metrics"].get("top_hessian_eigenvalue") is not None] for lab in labels}
        shown = [lab for lab in labels if values[lab]]
        if shown:
            fig, ax = plt.subplots(figsize=(6.0, 0.4 * len(shown) + 1.4), layout="constrained")
            for y, lab in enumerate(shown):
                ax.barh(y, np.mean(values[lab]), xerr=np.std(values[lab], ddof=1) if len(values[lab]) > 1 else None,
                        color=styles[lab]["color"], capsize=3, height=0.7)
                ax.scatter(values[lab], [y] * len(values[lab]), color="black", s=8, zorder=3)
            ax.set_yticks(range(len(shown)), shown)
            ax.set_ylabel("optimizer")
            ax.invert_yaxis()
            ax.set_xlabel("λmax at the end of training")
            ax.set_title("Sharpness at the end of training (bar: mean ± sd, dots: seeds)")
            save(fig, "sharpness", "λmax, the top Hessian eigenvalue of the training loss at the end of training, "
                 "per optimizer.")
    stats = {"cosine_similarity": ("cosine of stored entries", "mean pairwise cosine"),
             "exploration": ("exploration ‖mean(B)‖ / ‖m‖", "ratio")}
    series = {stat: {lab: [(p["iteration"], p[stat]) for r in by_label[lab]
                           for p in (r["metrics"].get("buffer_series") or []) if p.get(stat) is not None]
                     for lab in labels} for stat in stats}
    drawn = [stat for stat in stats if any(series[stat].values())]
    notes = []
    for stat in list(drawn):
        if _is_constant([y for points in series[stat].values() for _, y in points]):
            notes.append(f"{stats[stat][0]} is {_finite(y for pts in series[stat].values() for _, y in pts)[0]:g} "
                         "throughout")
            drawn.remove(stat)
    if drawn:
        arms = [lab for lab in labels if any(series[stat][lab] for stat in drawn)]
        fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn) + 1.8, 3.4), squeeze=False,
                                 layout="constrained")
        for ax, stat in zip(axes[0], drawn):
            for lab in arms:
                if series[stat][lab]:
                    curve(ax, lab, series[stat][lab])
            ax.set_title(stats[stat][0])
            ax.set_ylabel(stats[stat][1])
            ax.set_xlabel("training step")
        fig.suptitle("Gradient cancellation in the buffer during training")
        _arm_legend(fig, styles, arms, title="optimizer", line=True)
        save(fig, "buffer", "Mean pairwise cosine of the stored entries (low: they cancel) and exploration "
             "‖mean(B)‖/‖m‖ against the training step, mean ± sd over seeds."
             + (" Not drawn: " + "; ".join(notes) + "." if notes else ""))
    elif notes:
        lines += ["Buffer statistics: " + "; ".join(notes) + " (no figure).", ""]
    return lines


# ------------------------------------------------------------------ toy runs
def _toy_figure(landscape: str, sharpness) -> str:
    return _slug(f"toy-{landscape}{'' if sharpness is None else f'-s{sharpness:g}'}") + ".png"


def _toy_sections(runs, out: Path) -> list[str]:
    from .toy import plot_toy

    lines = ["## Toy landscapes", "",
             "Escape: the run ends in the basin of a different minimum that is at least as low as the one its "
             "start lies in (basins found by gradient descent; see `experiments/toy.py`). Mean ± std over seeds "
             "of the per-seed averages over starts.", "",
             "| landscape | optimizer | seeds | starts | escape ratio (%) | final loss | distance travelled |",
             "|---|---|---|---|---|---|---|"]
    by_case = defaultdict(list)
    for run in runs:
        c = run["config"]
        by_case[(c["landscape"], c["sharpness"] if c["landscape"] == "sharp_wide" else None)].append(run)
    sweep_rows = []
    for (landscape, sharpness), rs in sorted(by_case.items(), key=str):
        name = landscape + (f" (s = {sharpness:g})" if sharpness is not None else "")
        for opt in rs[0]["metrics"]["config"]["optimizers"]:
            res = [r["metrics"]["results"][opt] for r in rs]
            lines.append(f"| {name} | `{opt}` | {len(rs)} | {len(res[0]['escaped'])} | "
                         f"{_mean_sd([100 * x['escape_ratio'] for x in res])} | "
                         f"{_mean_sd([x['mean_final_loss'] for x in res])} | "
                         f"{_mean_sd([x['mean_travelled'] for x in res])} |")
            if sharpness is not None:
                sweep_rows += [{"optimizer": opt, "sharpness s": sharpness, "escape ratio (%)": 100 * x["escape_ratio"]}
                               for x in res]
        path = out / "figures" / _toy_figure(landscape, sharpness)
        plot_toy(sorted(rs, key=lambda r: r["metrics"]["config"]["seed"])[0]["metrics"], path)
    lines.append("")
    for (landscape, sharpness), rs in sorted(by_case.items(), key=str):
        name = _toy_figure(landscape, sharpness)
        lines.append(f"![{name}](figures/{name})")
    lines.append("")
    lines.append(_caption("Trajectories of one seed on each landscape (grey levels: the loss, darker is lower): "
                          "a white dot marks each start, a cross its end point; the panel title gives the escape "
                          "ratio over all starts of that seed."))
    lines.append("")
    if len({r["sharpness s"] for r in sweep_rows}) > 1:
        lines += _escape_figure(sweep_rows, out)
    return lines + [""]


def _escape_figure(sweep_rows, out: Path) -> list[str]:
    """sharp_wide: escape ratio against the width of the sharp minimum, one
    line per optimizer; optimizers with the same curve are drawn side by side
    (a small horizontal offset) and named in the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _theme()
    names = list(dict.fromkeys(r["optimizer"] for r in sweep_rows))
    styles = arm_styles(names)
    widths = sorted({r["sharpness s"] for r in sweep_rows})
    curves = {}
    for name in names:
        per_s = [[r["escape ratio (%)"] for r in sweep_rows if r["optimizer"] == name and r["sharpness s"] == s]
                 for s in widths]
        curves[name] = ([float(np.mean(v)) for v in per_s],
                        [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in per_s])
    dodge = 0.012 * (widths[-1] - widths[0])
    fig, ax = plt.subplots(figsize=(5.2 + 1.8, 3.6), layout="constrained")
    for i, name in enumerate(names):
        mean, sd = curves[name]
        xs = np.array(widths) + (i - (len(names) - 1) / 2) * dodge
        ax.errorbar(xs, mean, yerr=sd, color=styles[name]["color"], marker=styles[name]["marker"], markersize=6,
                    markeredgecolor="black", markeredgewidth=0.4, capsize=2, lw=1.3, label=name)
    ax.set_xlabel("width s of the sharp minimum (smaller: sharper)")
    ax.set_ylabel("escape ratio (%)")
    ax.set_title("sharp_wide: escape ratio against sharpness")
    fig.legend(title="optimizer", loc="outside right upper", frameon=False)
    path = out / "figures" / "toy-escape-vs-sharpness.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    same = defaultdict(list)
    for name in names:
        same[tuple(curves[name][0])].append(name)
    overlap = [group for group in same.values() if len(group) > 1]
    caption = ("Escape ratio (%) on the sharp_wide landscape against the width s of its sharp minimum, mean ± sd "
               "over seeds; markers of different optimizers at the same s are offset slightly sideways.")
    for group in overlap:
        caption += f" {', '.join(group)} have the same escape ratio at every s."
    return ["![escape-vs-sharpness](figures/toy-escape-vs-sharpness.png)", "", _caption(caption), ""]
