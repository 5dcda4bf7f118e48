"""A one-minute demo: Adam against Adam+CM on a small model.

    python -m experiments.demo [--steps 400] [--seed 0]

Both optimizers train the same MLP (same initialisation, same batches) to
regress a fixed random teacher network; the script prints the training loss
every 100 steps and the final buffer statistics of Adam+CM.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from cl_cm import AdamCM


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    def model():
        torch.manual_seed(args.seed)
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    teacher = model()
    runs = {"Adam": lambda ps: torch.optim.Adam(ps, lr=args.lr),
            "Adam+CM (C=5, decay=0.7, kappa=1)": lambda ps: AdamCM(ps, lr=args.lr)}
    final = {}
    for name, make in runs.items():
        net = model()
        for p in net.parameters():  # a different start from the teacher
            nn.init.normal_(p, std=0.1)
        opt = make(net.parameters())
        gen = torch.Generator().manual_seed(args.seed + 1)
        print(f"== {name}")
        for step in range(1, args.steps + 1):
            x = torch.randn(64, 20, generator=gen)
            with torch.no_grad():
                y = teacher(x)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"  step {step:5d}  loss {loss.item():.5f}")
        final[name] = loss.item()
        if isinstance(opt, AdamCM):
            print("  buffer:", {k: round(v, 3) for k, v in opt.buffer_stats().items()})
    return final


if __name__ == "__main__":
    main()
