"""Run by tests/test_distributed.py under torchrun (2 processes, gloo):
AdamCM and AdamCG under DDP and FSDP2 against a single-process reference on
the same global batches. Rank 0 writes the comparisons to a JSON file."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import cl_cm.norms
from cl_cm import SAM, AdamCG, AdamCM

STEPS, GLOBAL_BATCH = 30, 16
OPTIONS = dict(lr=1e-2, buffer_size=3, decay=0.95, weight_decay=0.01)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    scale = 0.2 + 3.0 * torch.rand((), generator=g, dtype=torch.float64)  # varying norms: entries get dropped
    return scale * torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64), \
        torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)


def train(net, opt, steps, start=0, shard=None):
    for t in range(start, start + steps):
        x, y = batch(t)
        if shard is not None:
            rank, world = shard
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def train_sam(net, opt, steps, shard=None):
    for t in range(steps):
        x, y = batch(t)
        if shard is not None:
            rank, world = shard
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)


STAT_KEYS = ("size", "mean_priority", "exploration", "cosine_similarity", "replacement_rate")


def stats_gap(a: dict, b: dict) -> float:
    """Largest relative difference between two buffer_stats() results."""
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in STAT_KEYS)


def full_params(net):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in net.parameters()])


def priorities(opt):
    return next(iter(opt.state.values()))["priority"]


def fsdp(net):
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


def finish(results: dict, out_path: str) -> None:
    """Rank 0 writes ``results``; every rank leaves the process group and
    exits without interpreter finalization. A Gloo worker thread can still
    be releasing its last collective (FSDP2's coalesced all-gather, whose
    tensors are Python objects) when the interpreter shuts down; taking the
    GIL then aborts the process (SIGABRT, "terminate called without an
    active exception") although every result was computed and written."""
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, cls in (("AdamCM", AdamCM), ("AdamCG", AdamCG)):
        ref = model()
        ref_opt = cls(ref.parameters(), **OPTIONS)
        train(ref, ref_opt, STEPS)
        expected = full_params(ref)

        ddp = nn.parallel.DistributedDataParallel(model())
        opt = cls(ddp.parameters(), **OPTIONS)
        train(ddp, opt, STEPS, shard=(rank, world))
        results[f"ddp_{name}"] = float((full_params(ddp.module) - expected).abs().max())

        sharded = fsdp(model())
        opt = cls(sharded.parameters(), **OPTIONS)
        train(sharded, opt, STEPS, shard=(rank, world))
        results[f"fsdp_{name}"] = float((full_params(sharded) - expected).abs().max())
        gathered = [None] * world
        dist.all_gather_object(gathered, priorities(opt))
        results[f"fsdp_{name}_priorities_agree"] = all(g == gathered[0] for g in gathered)
        results[f"fsdp_{name}_priorities_match_reference"] = max(
            abs(a - b) for a, b in zip(gathered[0], priorities(ref_opt))) < 1e-9
        # buffer statistics of the whole model on every rank (the shards' sums all-reduced) ...
        expected_stats = ref_opt.buffer_stats(reset=False)
        results[f"fsdp_{name}_stats"] = stats_gap(opt.buffer_stats(reset=False), expected_stats)
        real = cl_cm.norms.all_reduce_sum
        cl_cm.norms.all_reduce_sum = lambda values, group: values
        try:  # ... and not those of one rank's shard
            results[f"fsdp_{name}_stats_local"] = stats_gap(opt.buffer_stats(reset=False), expected_stats)
        finally:
            cl_cm.norms.all_reduce_sum = real

    # Adam+CM+SAM under FSDP2: the perturbation's norm is the global one
    ref = model()
    train_sam(ref, SAM(ref.parameters(), AdamCM, rho=0.05, **OPTIONS), STEPS)
    sharded = fsdp(model())
    train_sam(sharded, SAM(sharded.parameters(), AdamCM, rho=0.05, **OPTIONS), STEPS, shard=(rank, world))
    results["fsdp_sam_AdamCM"] = float((full_params(sharded) - full_params(ref)).abs().max())

    # the deliberately wrong priority: every rank uses the norm of its own shard
    real = cl_cm.norms.all_reduce_sum
    cl_cm.norms.all_reduce_sum = lambda values, group: values
    try:
        ref = model()
        train(ref, AdamCM(ref.parameters(), **OPTIONS), STEPS)
        sharded = fsdp(model())
        opt = AdamCM(sharded.parameters(), **OPTIONS)
        train(sharded, opt, STEPS, shard=(rank, world))
        results["fsdp_local_norm"] = float((full_params(sharded) - full_params(ref)).abs().max())
        gathered = [None] * world
        dist.all_gather_object(gathered, priorities(opt))
        results["fsdp_local_norm_priorities_agree"] = all(g == gathered[0] for g in gathered)
    finally:
        cl_cm.norms.all_reduce_sum = real

    # checkpoint under FSDP2: model through torch.distributed.checkpoint, optimizer state per rank
    import torch.distributed.checkpoint as dcp

    straight = fsdp(model())
    opt = AdamCM(straight.parameters(), **OPTIONS)
    train(straight, opt, 22, shard=(rank, world))
    first = fsdp(model())
    opt1 = AdamCM(first.parameters(), **OPTIONS)
    train(first, opt1, 12, shard=(rank, world))
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)
    dcp.save({"model": first.state_dict()}, checkpoint_id=f"{folder[0]}/model")
    torch.save(opt1.state_dict(), f"{folder[0]}/optimizer-rank{rank}.pt")
    dist.barrier()
    second = fsdp(model(seed=99))
    state = {"model": second.state_dict()}
    dcp.load(state, checkpoint_id=f"{folder[0]}/model")
    second.load_state_dict(state["model"])
    opt2 = AdamCM(second.parameters(), **OPTIONS)
    opt2.load_state_dict(torch.load(f"{folder[0]}/optimizer-rank{rank}.pt", weights_only=True))
    train(second, opt2, 10, start=12, shard=(rank, world))
    results["fsdp_checkpoint"] = float((full_params(second) - full_params(straight)).abs().max())
    finish(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
