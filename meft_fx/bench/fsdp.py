"""Memory per rank under FSDP2: meft_fx (`meft_fx.shard`) beside LoRA + checkpointing + a chunked loss, sharded
the same way (each decoder layer a unit, as torchtune's LoRA recipe; meft_fx: each coupling half).

    python -m meft_fx.bench --fsdp --arch smollm2 --depths 30 --seqs 512 [--out docs/bench_fsdp]

Starts two CPU processes (gloo) itself; each trains on one sequence of its own (batch 1 per rank). Per rank
and method: the MiB of parameters the rank holds between steps (frozen and trainable: its shards), and the
step's peak above what was alive at its start (activations, the weights FSDP gathers for a unit while it
runs, gradients), from the allocator events (`meft_fx.memory`). Rank 0 prints the table (and writes
fsdp.md in --out).
"""
from __future__ import annotations

import os
import sys

import torch

from ..memory import MiB, measure_step_memory
from .models import BenchModel

__all__ = ["run_fsdp", "format_fsdp", "FSDP_METHODS"]

FSDP_METHODS = ("lora_ckpt_chunked", "meft1_exact", "meft3_exact")  # meft1: the default on SmolLM2
WORLD = 2


def _held(model) -> tuple[float, float]:
    """(MiB of frozen, MiB of trainable parameters) this rank holds (a sharded parameter's local shard)."""
    out = [0, 0]
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[p.requires_grad] += local.numel() * local.element_size()
    return out[0] / MiB, out[1] / MiB


def _shard(method: str, runner, mesh):
    from torch.distributed.fsdp import fully_shard

    import meft_fx
    if method.startswith("meft"):
        return meft_fx.shard(runner, mesh)
    layers = runner.get_base_model().model.layers  # LoRA: every decoder layer a unit, then the root
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(runner, mesh=mesh)


def _measure(prepare, method: str, spec: BenchModel, depth: int, seq: int, rank: int, mesh, seed: int) -> dict:
    config = spec.config(depth, seq)
    model = spec.build(config, torch.float32, "cpu", seed)
    batch = spec.batch(config, WORLD, seq, "cpu", seed)
    batch = {k: v[rank:rank + 1] for k, v in batch.items()}  # a sequence of its own per rank
    runner, note = prepare(method, model, batch, spec)
    runner = _shard(method, runner, mesh)
    params = [p for p in runner.parameters() if p.requires_grad]

    def step():
        runner(**batch).loss.backward()

    step()  # warm-up: creates the gradient buffers
    for p in params:
        p.grad = None
    frozen, trainable = _held(runner)
    mem = measure_step_memory(step, "cpu")
    return dict(method=method, note=note, depth=depth, seq=seq, rank=rank, frozen_mib=frozen,
                trainable_mib=trainable, step_peak_mib=mem.peak_bytes / MiB)


def _worker(rank: int, prepare, port: int, depth: int, seqs, seed: int, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        spec = BenchModel.smollm2()
        rows = []
        for seq in seqs:
            for method in FSDP_METHODS:
                rows.append(_measure(prepare, method, spec, depth, seq, rank, mesh, seed))
                if rank == 0:
                    r = rows[-1]
                    print(f"[fsdp] {method} seq {seq}: held {r['frozen_mib'] + r['trainable_mib']:.1f} MiB, "
                          f"step peak {r['step_peak_mib']:.1f} MiB", file=sys.stderr, flush=True)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            torch.save([r for rs in gathered for r in rs], out_file)
    finally:
        dist.destroy_process_group()


def run_fsdp(prepare, depth: int, seqs, seed: int, out_dir: str | None = None) -> list[dict]:
    """Spawn the two processes, return every (method, seq, rank) row; with `out_dir`, write fsdp.md there.
    `prepare`: `meft_fx.bench.run.prepare`, which builds each method's model (passed in: run imports this module)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(prepare, port, depth, list(seqs), seed, out_file), nprocs=WORLD, join=True)
        rows = torch.load(out_file, weights_only=False)
    report = format_fsdp(rows)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "fsdp.md"), "w") as f:
            f.write(report)
    return rows


def format_fsdp(rows: list[dict]) -> str:
    """A markdown table: per sequence length and method, rank 0's and rank 1's held MiB and step peak, and the
    total (held + peak) as a ratio to LoRA's."""
    lines = ["| seq | method | rank | frozen MiB held | trainable MiB held | step peak MiB | held + peak | vs LoRA |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next((b for b in rows if b["seq"] == r["seq"] and b["rank"] == r["rank"]
                     and b["method"] == FSDP_METHODS[0]), None)
        total = r["frozen_mib"] + r["trainable_mib"] + r["step_peak_mib"]
        ratio = total / (base["frozen_mib"] + base["trainable_mib"] + base["step_peak_mib"]) if base else float("nan")
        lines.append(f"| {r['seq']} | {r['method']} | {r['rank']} | {r['frozen_mib']:.1f} | {r['trainable_mib']:.2f} | "
                     f"{r['step_peak_mib']:.1f} | {total:.1f} | {ratio:.2f}× |")
    notes = sorted({f"- {r['method']}: {r['note']}" for r in rows})
    return "\n".join(lines + [""] + notes) + "\n"
