"""Two CPU processes (gloo) for the multi-process tests: spawn them, collect what each saved."""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, body, port, out_dir):
    """Run `body(rank, out_dir, results)` in an initialised gloo group; save `results` (or the traceback)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        body(rank, out_dir, results)
    except Exception:  # noqa: BLE001 - reported by the parent
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(body, out_dir) -> list[dict]:
    """Spawn WORLD processes running `body` (a module-level function: spawn pickles it); their results, by rank.
    Fails naming the rank and its traceback when one raised."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(body, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    res = [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, d in enumerate(res):
        assert "error" not in d, f"rank {r} failed:\n{d['error']}"
    return res


def full(t):
    """The whole tensor of an FSDP2-sharded one (a collective), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_grads(model) -> dict:
    """{name: whole gradient or None} of every trainable parameter (collective under FSDP2)."""
    return {name: None if p.grad is None else full(p.grad).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def part(inputs: dict, rank: int) -> dict:
    """Rank `rank`'s share of a batch: consecutive rows."""
    n = next(iter(inputs.values())).shape[0] // WORLD
    return {k: v[rank * n:(rank + 1) * n] for k, v in inputs.items()}
