"""Time one optimizer step on a ResNet-18-sized parameter set (11.2M parameters).

    python -m experiments.bench_step [--device cpu|cuda] [--steps 30] [--buffer-size 5] [--threads N]

The optimizers take turns, one step each, on the same gradients. Every
step gets a fresh gradient (a random draw scaled by a random factor, so
that gradient norms differ and buffer entries get replaced). For each
optimizer it prints the median step time after the warm-up steps, its ratio to torch.optim.Adam with
foreach=True and with fused=True measured in the same process, the bytes of
optimizer state, the buffer's replacement rate, and the time of the first
step (state allocation; for ``compiled=True`` the compilation, which depends
on whether inductor's cache already holds the kernels: point
``TORCHINDUCTOR_CACHE_DIR`` at an empty folder for the cold cost). The buffer
is measured in each of its dtypes (float32, bfloat16, the 8-bit buffer).
``--json FILE`` also writes the figures. This is a benchmark, not a test:
docs/performance.md records its output beside the command.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from cl_cm import AdamCG, AdamCM, buffered


def resnet18_shapes(num_classes: int = 10) -> list[torch.Size]:
    """Parameter shapes of torchvision's ResNet-18 (11.2M parameters for 10 classes)."""
    import torchvision

    return [p.shape for p in torchvision.models.resnet18(num_classes=num_classes).parameters()]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors held in the optimizer's per-parameter state,
    including tensors inside container objects (the authors' TensorList)."""
    seen: set[int] = set()

    def walk(obj, depth=0) -> int:
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() in seen:
                return 0
            seen.add(obj.data_ptr())
            return obj.numel() * obj.element_size()
        if depth > 3:
            return 0
        if isinstance(obj, dict):
            total = sum(walk(v, depth + 1) for v in obj.values())
            return total + (walk(vars(obj), depth + 1) if hasattr(obj, "__dict__") else 0)
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth + 1) for v in obj)
        return 0

    return sum(walk(st) for st in opt.state.values())


def candidates(buffer_size: int, device: str) -> dict[str, Callable]:
    c = buffer_size
    out = {
        "Adam(foreach)": lambda ps: torch.optim.Adam(ps, foreach=True),
        "Adam(fused)": lambda ps: torch.optim.Adam(ps, fused=True),
        "Adam(for-loop)": lambda ps: torch.optim.Adam(ps, foreach=False),
        f"AdamCM C={c} (default: fused)": lambda ps: AdamCM(ps, buffer_size=c),
        f"AdamCM C={c} compiled": lambda ps: AdamCM(ps, buffer_size=c, compiled=True),
        f"AdamCM C={c} foreach": lambda ps: AdamCM(ps, buffer_size=c, foreach=True),
        f"AdamCM C={c} for-loop": lambda ps: AdamCM(ps, buffer_size=c, foreach=False),
        f"AdamCM C={c} bf16 buffer": lambda ps: AdamCM(ps, buffer_size=c, buffer_dtype=torch.bfloat16),
        f"AdamCM C={c} compiled, bf16 buffer": lambda ps: AdamCM(ps, buffer_size=c, compiled=True,
                                                                 buffer_dtype=torch.bfloat16),
        f"AdamCM C={c} 8-bit buffer": lambda ps: AdamCM(ps, buffer_size=c, buffer_dtype=torch.int8),
        f"AdamCM C={c} compiled, 8-bit buffer": lambda ps: AdamCM(ps, buffer_size=c, compiled=True,
                                                                  buffer_dtype=torch.int8),
        f"AdamCM C={c} second_moment=gradient": lambda ps: AdamCM(ps, buffer_size=c, second_moment="gradient"),
        f"AdamCG C={c}": lambda ps: AdamCG(ps, buffer_size=c),
    }
    try:  # the authors' implementation, only if the user has installed it
        from cmoptimizer.optim import Adam_CM  # type: ignore

        out[f"authors' Adam_CM topC={c}"] = lambda ps: Adam_CM(ps, topC=c)
    except ImportError:
        pass
    return out


def bench(makers: dict[str, Callable], shapes, device: str, steps: int, warmup: int, seed: int) -> dict:
    """Time every optimizer on the same gradients, one step each in turn, so
    that slow drifts of the machine (turbo, other load) hit all of them alike."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
    runs = {}
    for name, make in makers.items():
        params = [torch.empty(s, device=device).normal_(0, 0.02).requires_grad_() for s in shapes]
        runs[name] = (params, make(params), [])
    for i in range(warmup + steps):
        scale = float(torch.empty(()).uniform_(0.5, 1.5, generator=gen))
        grads = [g * scale for g in pool[i % len(pool)]]
        for params, opt, times in runs.values():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    results = {}
    for name, (params, opt, times) in runs.items():
        buf = buffered(opt)
        stats = buf.buffer_stats() if buf is not None else {}
        results[name] = {
            "median_ms": 1e3 * statistics.median(times[warmup:]), "first_step_s": times[0],
            "state_MB": state_bytes(opt) / 2**20,
            "buffer_MB": (buf.buffer_nbytes() / 2**20) if buf is not None else None,
            "replacement_rate": stats.get("replacement_rate")}
    return results


def profile(names: list[str], makers: dict[str, Callable], shapes, device: str, warmup: int) -> None:
    """Print the functions that take the most own time in 10 steps of each
    named optimizer (after ``warmup`` steps), and the median step time of
    fused Adam on the same gradients for scale."""
    import cProfile
    import pstats

    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    for name in ["Adam(fused)"] + names:
        params = [torch.empty(s, device=device).normal_(0, 0.02).requires_grad_() for s in shapes]
        opt = makers[name](params)
        prof = cProfile.Profile()
        times = []
        for i in range(warmup + 10):
            for p, g in zip(params, grads):
                p.grad = g * (0.5 + 0.1 * (i % 7))
            t0 = time.perf_counter()
            if i >= warmup:
                prof.enable()
            opt.step()
            if i >= warmup:
                prof.disable()
            times.append(time.perf_counter() - t0)
        print(f"\n== profile of {name}: median step {1e3 * statistics.median(times[warmup:]):.1f} ms")
        if name != "Adam(fused)":
            pstats.Stats(prof).sort_stats("tottime").print_stats(8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--buffer-size", type=int, default=5, help="C for the buffered optimizers (default 5)")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only matching optimizers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--profile", default=None,
                    help="also profile 10 steps of the optimizers whose name contains this (cProfile, "
                         "by own time): where a step's time goes")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = resnet18_shapes()
    n = sum(s.numel() for s in shapes)
    print(f"{n / 1e6:.2f}M parameters in {len(shapes)} tensors; device {args.device}; "
          f"torch {torch.__version__}; {torch.get_num_threads()} CPU threads; {platform.processor() or platform.machine()}")
    runs = candidates(args.buffer_size, args.device)
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        runs = {name: f for name, f in runs.items() if name.startswith("Adam(") or any(k in name for k in keep)}
    results = bench(runs, shapes, args.device, args.steps, args.warmup, args.seed)
    base_foreach = results["Adam(foreach)"]["median_ms"]
    base_fused = results["Adam(fused)"]["median_ms"]
    print(f"{'optimizer':40s} {'median ms':>10s} {'/Adam foreach':>14s} {'/Adam fused':>12s} "
          f"{'state MB':>9s} {'buffer MB':>10s} {'replaced':>9s} {'1st step s':>10s}")
    for name, r in results.items():
        r["vs_adam_foreach"] = r["median_ms"] / base_foreach
        r["vs_adam_fused"] = r["median_ms"] / base_fused
        buf = "" if r["buffer_MB"] is None else f"{r['buffer_MB']:.1f}"
        rep = "" if r["replacement_rate"] is None else f"{r['replacement_rate']:.2f}"
        print(f"{name:40s} {r['median_ms']:10.1f} {r['vs_adam_foreach']:14.2f} {r['vs_adam_fused']:12.2f} "
              f"{r['state_MB']:9.1f} {buf:>10s} {rep:>9s} {r['first_step_s']:10.2f}")
    if args.profile:
        profile([name for name in runs if args.profile in name], runs, shapes, args.device, args.warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "parameters": n, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
