"""What a resumable training job is, without Ray: its stable name, the settings it refuses to resume with
other values, the per-worker schedule (``train_loop_config``) and its checkpoint files. ``pipelines.runner``
hands these to Ray Train."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

JOB_FILE = "weit_job.json"
LATER_SETTINGS = (("task", "classification"), ("family", None), ("size", None))
"""Settings added after jobs were first made: left out at these values, so an older job still resumes."""
SHUFFLE_BUFFER_MAX = 32768
"""Rows each worker keeps for its local shuffle; a shard up to this size is fully shuffled every epoch."""


class JobSettingsError(ValueError):
    """A job directory made with other settings; the message says how to resume or start anew."""


def job_name(out: str | Path, prefix: str) -> str:
    """A stable run name for an output file, so re-running the same command resumes it."""
    path = Path(out).resolve()
    return f"{prefix}-{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def job_guard(directory: Path, settings: dict) -> bool:
    """Refuse to resume a job directory made with different settings; returns True when resuming."""
    settings = {k: v for k, v in settings.items() if (k, v) not in LATER_SETTINGS}
    settings, f = json.loads(json.dumps(settings, default=str)), directory / JOB_FILE
    if f.is_file():
        before = json.loads(f.read_text())
        if diff := sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k)):
            raise JobSettingsError(f"{directory} holds a job with different settings ({', '.join(diff[:6])}); rerun "
                                   f"with the same flags to resume, or pass another --out / --name to start a new job")
        return True
    directory.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
    return False


def worker_config(build: Callable[[dict], Any], spec: Any, *, epochs: int, lr: float, weight_decay: float,
                  warmup_epochs: float, batch_size: int, workers: int, train_rows: int, seed: int,
                  threads: int | None, cpus_per_worker: float = 1.0, **extra) -> dict:
    """A worker's config: the global batch split over workers, the LR schedule laid out over the steps each
    worker takes (equal shards, so equal step counts); torch threads default to the worker's CPUs, rounded."""
    threads, per_worker = threads or max(1, math.floor(cpus_per_worker + 0.5)), max(1, batch_size // workers)
    rows_per_worker = train_rows // workers
    steps_per_epoch = max(1, math.ceil(rows_per_worker / per_worker))
    return {"build": build, "spec": spec.to_dict(), "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "batch_size": per_worker, "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * epochs,
            "warmup_steps": round(steps_per_epoch * warmup_epochs), "seed": seed, "threads": threads,
            "shuffle_buffer": max(1, min(rows_per_worker, SHUFFLE_BUFFER_MAX)), "teacher": None, "tau": 2.0,
            "wrap_batches": None, "task": "classification", **extra}


def save_train_state(d: Path, keep: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in keep.state_dict().items()}, str(d / "model.safetensors"))
    # our own file, read back only by us with weights_only=True: plain tensors and numbers, no pickled code
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
    (d / "state.json").write_text(json.dumps(state, indent=1))


def load_train_state(d: Path, keep: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict:
    """Inverse of :func:`save_train_state`; weights are copied into ``keep`` in place (any device)."""
    device = next(keep.parameters()).device
    keep.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)), strict=True)
    if optimizer is not None:
        saved = torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return json.loads((d / "state.json").read_text())


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sums over data-parallel workers (the metrics are sums, so uneven shards still average exactly)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor, device: torch.device | str, batch: int = 512) -> torch.Tensor:
    """``model``'s outputs on ``x`` in evaluation batches, on the CPU."""
    model.eval()
    return torch.cat([model(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def epoch_line(stage: str, epochs: int, m: dict, metric: str = "acc", batch_metric: str | None = None) -> str:
    """One epoch's metrics as the terminal shows them: loss, the training batches' score, the test metric,
    agreement, each watched size."""
    train = f"train_{batch_metric or metric}"
    parts = [f"{stage} epoch {int(m['epoch'])}/{epochs}", f"loss {m['loss']:.4f}", f"{train} {m[train]:.4f}",
             f"test_{metric} {m[f'test_{metric}']:.4f}"]
    if "test_agreement" in m:
        parts.append(f"agreement {m['test_agreement']:.4f}")
    if sized := [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith(f"test_{metric}/")]:
        parts.append(f"test_{metric} by size: {', '.join(sized)}")
    return "  ".join([*parts, f"{m['epoch_s']:.1f}s"])
