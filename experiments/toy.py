"""Toy 2-D landscapes: does Adam+CM explore more and escape sharp minima?

Landscapes (all of a point p = (x, y)):

* ``goldstein_price``: Goldstein & Price (1971), global minimum 3 at (0, −1)
  and local minima (e.g. 30 near (−0.6, −0.4), 84 near (1.8, 0.2)); starts in
  [−2, 2]²; optimised on log f so that step sizes mean the same everywhere.
* ``ackley``: Ackley (1987), global minimum 0 at the origin in a lattice of
  local minima; starts in [−3, 3]².
* ``sharp_wide``: f(p) = 1 − exp(−|p−a|²/(2s²)) − exp(−|p−b|²/(2w²)) + 0.002|p−b|²
  with a sharp minimum at a = (0, 0) of width s = ``sharpness`` next to the
  start, and a wide one (w = 1.5) at b = (3, 3), slightly deeper (0 against
  about 0.018); starts are drawn in the disc of radius s around a, i.e.
  inside the sharp basin.

**Escape** (the number the paper's claim is about): a run *escapes* when it
ends in the basin of a different minimum than the one its start lies in, and
that minimum is at least as low. A point's basin is found by running plain
gradient descent from it until it stops moving (``basin_minimum``). On
``sharp_wide`` this means leaving the sharp minimum for the wide one.

For each optimizer and start the run records the final loss, the distance
travelled (sum of step lengths) and whether it escaped; the escape ratio is
the fraction of starts that escaped. Every start gets its own optimizer (the
buffer's priority is a norm over the whole parameter group, so runs must not
share one).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from cl_cm import make_optimizer

from .config import LANDSCAPES, TOY_OPTIMIZERS, ToyConfig  # noqa: F401 (re-exported; the settings' home)
from .results import RunKind


def goldstein_price(p: torch.Tensor) -> torch.Tensor:
    x, y = p[..., 0], p[..., 1]
    a = 1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x**2 - 14 * y + 6 * x * y + 3 * y**2)
    b = 30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x**2 + 48 * y - 36 * x * y + 27 * y**2)
    return torch.log(a * b)


def ackley(p: torch.Tensor) -> torch.Tensor:
    x, y = p[..., 0], p[..., 1]
    return (-20 * torch.exp(-0.2 * torch.sqrt(0.5 * (x**2 + y**2) + 1e-12))
            - torch.exp(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))) + math.e + 20)


def sharp_wide(p: torch.Tensor, sharpness: float = 0.3) -> torch.Tensor:
    a = torch.tensor([0.0, 0.0], dtype=p.dtype)
    b = torch.tensor([3.0, 3.0], dtype=p.dtype)
    d_a = ((p - a) ** 2).sum(-1)
    d_b = ((p - b) ** 2).sum(-1)
    return 1 - torch.exp(-d_a / (2 * sharpness**2)) - torch.exp(-d_b / (2 * 1.5**2)) + 0.002 * d_b


def landscape_fn(cfg: ToyConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    if cfg.landscape == "goldstein_price":
        return goldstein_price
    if cfg.landscape == "ackley":
        return ackley
    if cfg.landscape == "sharp_wide":
        return lambda p: sharp_wide(p, cfg.sharpness)
    raise ValueError(f"unknown landscape {cfg.landscape!r}; choose one of {', '.join(LANDSCAPES)}")


def draw_starts(cfg: ToyConfig) -> torch.Tensor:
    """Starting points, from the run's seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.landscape == "sharp_wide":
        radius = cfg.sharpness * torch.rand(cfg.starts, generator=gen).sqrt()
        angle = 2 * math.pi * torch.rand(cfg.starts, generator=gen)
        return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1).double()
    half = 2.0 if cfg.landscape == "goldstein_price" else 3.0
    return ((torch.rand(cfg.starts, 2, generator=gen) * 2 - 1) * half).double()


def basin_minimum(f, points: torch.Tensor, lr: float = 0.02, steps: int = 4000, tol: float = 1e-7) -> torch.Tensor:
    """Where gradient descent from each point settles (its basin's minimum).

    Steps follow the gradient with length min(lr·|g|, lr) and shrink by half
    whenever the loss would rise (a backtracking line search per point), so
    the descent stays inside the basin it starts in."""
    p = points.detach().clone()
    step = torch.full((len(p), 1), lr, dtype=p.dtype)
    for _ in range(steps):
        q = p.clone().requires_grad_(True)
        loss = f(q)
        (g,) = torch.autograd.grad(loss.sum(), q)
        with torch.no_grad():
            direction = g / g.norm(dim=1, keepdim=True).clamp_min(1.0)
            trial = p - step * direction
            worse = (f(trial) > loss).unsqueeze(1)
            p = torch.where(worse, p, trial)
            step = torch.where(worse, step * 0.5, (step * 1.2).clamp_max(lr))
        if (step * direction).norm(dim=1).max() < tol:
            break
    return p


def _optimizer(name: str, param: torch.Tensor, cfg: ToyConfig):
    kwargs = dict(lr=cfg.lr, **cfg.extra)
    if name in ("adam_sam", "adam_cm_sam"):
        kwargs["rho"] = cfg.rho
    return make_optimizer(name, [param], **kwargs)


def run_toy(cfg: ToyConfig, keep_trajectories: int = 8) -> dict:
    """Every optimizer from every start; returns per-optimizer metrics and a
    few trajectories for plotting."""
    f = landscape_fn(cfg)
    starts = draw_starts(cfg)
    start_min = basin_minimum(f, starts)
    results = {}
    for name in cfg.optimizers:
        torch.manual_seed(cfg.seed)
        finals, travelled, trajectories = [], [], []
        for i, start in enumerate(starts):
            p = start.clone().requires_grad_(True)
            opt = _optimizer(name, p, cfg)
            path = [p.detach().clone()]

            def closure():
                opt.zero_grad()
                loss = f(p)
                loss.backward()
                return loss

            for _ in range(cfg.steps):
                opt.step(closure)
                path.append(p.detach().clone())
            path = torch.stack(path)
            finals.append(path[-1])
            travelled.append(float((path[1:] - path[:-1]).norm(dim=1).sum()))
            if i < keep_trajectories:
                trajectories.append(path[:: max(1, cfg.steps // 100)].tolist())
        finals = torch.stack(finals)
        if not torch.isfinite(f(finals)).all():
            from strategies.errors import NonFiniteLossError

            raise NonFiniteLossError(f"{name} on {cfg.landscape}: the loss became NaN or Inf with learning rate "
                                     f"{cfg.lr:g}; lower --lr")
        final_min = basin_minimum(f, finals)
        moved = (final_min - start_min).norm(dim=1) > 1e-2
        lower = f(final_min) <= f(start_min) + 1e-6
        escaped = (moved & lower).tolist()
        results[name] = {
            "final_loss": f(finals).tolist(), "travelled": travelled, "escaped": escaped,
            "escape_ratio": sum(escaped) / len(escaped),
            "mean_final_loss": float(f(finals).mean()), "mean_travelled": sum(travelled) / len(travelled),
            "trajectories": trajectories,
        }
    return {"kind": "toy", "config": {**cfg.__dict__, "optimizers": list(cfg.optimizers)},
            "starts": starts.tolist(), "results": results}


def plot_toy(result: dict, path: str | Path) -> None:
    """Contour plot of the landscape with a few trajectories per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cfg = ToyConfig(**{**result["config"], "optimizers": tuple(result["config"]["optimizers"])})
    f = landscape_fn(cfg)
    names = list(result["results"])
    pts = torch.tensor([pt for r in result["results"].values() for tr in r["trajectories"] for pt in tr]
                       + result["starts"])
    lo, hi = pts.min(0).values - 0.5, pts.max(0).values + 0.5
    xs, ys = torch.linspace(float(lo[0]), float(hi[0]), 200), torch.linspace(float(lo[1]), float(hi[1]), 200)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = f(torch.stack([gx, gy], -1).double())
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.0, 3.6), squeeze=False,
                             layout="constrained", sharey=True)
    colors = sns.color_palette("colorblind", len(names))
    for ax, name, color in zip(axes[0], names, colors):
        levels = ax.contourf(gx, gy, z, levels=30, cmap="Greys_r", alpha=0.85)
        for tr in result["results"][name]["trajectories"]:
            tr = torch.tensor(tr)
            ax.plot(tr[:, 0], tr[:, 1], color=color, lw=1.2)
            ax.scatter(tr[0, 0], tr[0, 1], color="white", edgecolor="black", s=14, zorder=3)
            ax.scatter(tr[-1, 0], tr[-1, 1], color=color, edgecolor="black", marker="X", s=30, zorder=3)
        r = result["results"][name]
        ax.set_title(f"{name}: escape {100 * r['escape_ratio']:.0f}%", fontsize=9)
        ax.set_xlabel("x₁")
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("x₂")
    fig.colorbar(levels, ax=list(axes[0]), label="loss f(x)", shrink=0.9)
    title = cfg.landscape + (f" (s = {cfg.sharpness:g})" if cfg.landscape == "sharp_wide" else "")
    fig.suptitle(f"{title}: trajectories from {len(result['results'][names[0]]['trajectories'])} starts "
                 f"(dot: start, cross: end), lr {cfg.lr:g}, {cfg.steps} steps", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


class ToyRun(RunKind):
    """``cl-cm toy``: one landscape, sharpness and seed (:class:`ToyConfig`),
    in ``<out>/<label>/seed<S>``, through :func:`experiments.results.execute`."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def label(self, cfg: ToyConfig) -> str:
        return cfg.landscape + (f"-s{cfg.sharpness:g}" if cfg.landscape == "sharp_wide" else "")

    def folder(self, cfg: ToyConfig) -> Path:
        return self.out / self.label(cfg) / f"seed{cfg.seed}"

    def settings(self, cfg: ToyConfig) -> dict:
        return {**cfg.__dict__, "optimizers": list(cfg.optimizers)}

    def protocol(self, cfg: ToyConfig) -> str:
        return f"toy landscape {cfg.landscape}"

    def train(self, cfg: ToyConfig, out: Path, quiet: bool) -> dict:
        result = run_toy(cfg)
        plot_toy(result, out / "trajectories.png")
        return result

    def summary(self, metrics: dict, cfg: ToyConfig) -> str:
        return f"{self.label(cfg)} seed {cfg.seed}: " + ", ".join(
            f"{k} escape {100 * v['escape_ratio']:.0f}% loss {v['mean_final_loss']:.3g} "
            f"travelled {v['mean_travelled']:.2f}" for k, v in metrics["results"].items())
