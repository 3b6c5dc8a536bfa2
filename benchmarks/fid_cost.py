"""What one FID evaluation of the generation task costs: sampling vs feature extraction, on this machine.

An evaluation (``weit_core.tasks.generation.evaluate_generation``) samples ``--samples`` images with the
``--steps``-step Euler sampler from a DiT of ``--size``, extracts EfficientNet-Lite0 features of the samples
(the real images' features are computed once per split and count and cached: timed apart as the first-call
cost), takes the Fréchet distance, runs the judge classifier for ``class_acc`` and the denoising loss.
Each part is timed in wall seconds and in this process's CPU seconds (on a shared machine wall time also
counts other people's work; CPU seconds are nearer what an idle machine would take). The weights of the DiT
do not change the cost, so it is a freshly built one. The load average is recorded with the numbers.

    .venv/bin/python benchmarks/fid_cost.py --samples 1000 --steps 10 --threads 2

``--reference`` adds what FID numbers mean at this sample count: the real test split against the train split,
Gaussian noise images and the blurred test split. ``--train-steps N`` first trains the DiT for N steps through
``weit_core.train.fit`` (batch 64, AdamW ``--lr``) on the Fashion-MNIST train split and reports its FID and
class_acc next to the untrained model's (the timings do not depend on the weights):

    .venv/bin/python benchmarks/fid_cost.py --samples 1000 --steps 10 --reference --train-steps 2000

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from weit_core import fid
from weit_core.data import load_fashion_mnist
from weit_core.models.dit import DEFAULT_SIZE, DIT
from weit_core.tasks import generation
from weit_core.train import (
    cycle_batches,
    fit,
    iterate_batches,
    make_optimizer,
    seed_everything,
    warmup_cosine,
)


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Any, dict]:
    """``fn()``'s result and its median wall / CPU seconds over ``repeats`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return out, {"wall_s": round(sorted(walls)[len(walls) // 2], 2), "cpu_s": round(sorted(cpus)[len(cpus) // 2], 2)}


def reference(data, n: int) -> dict:
    """FID of the real test split (n images) against the train split, noise and the blurred test split."""
    import torchvision.transforms.functional as TF

    from weit_core.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    test, train = ((s.x[:n] * FASHION_MNIST_STD + FASHION_MNIST_MEAN).clamp(0, 1) for s in (data.test, data.train))
    noise = (torch.randn(test.shape, generator=torch.Generator().manual_seed(0)) * test.std() + test.mean()).clamp(0, 1)
    others = {"train": train, "gaussian_noise": noise, "blurred_test": TF.gaussian_blur(test, 5, 1.5)}
    return {f"fid_test_vs_{k}": round(fid.fid(test, v), 2) for k, v in others.items()}


def train(model: torch.nn.Module, data, steps: int, lr: float, batch_size: int = 64) -> dict:
    """``steps`` optimizer steps (warm-up 5%, cosine) as one pass of the loop over endless shuffled batches."""
    opt = make_optimizer(model, lr)
    sched = warmup_cosine(opt, steps, steps // 20)
    t = time.perf_counter()
    hist = fit(model, lambda ep: cycle_batches(data.train.x, data.train.y, batch_size, seed=ep), opt, epochs=1,
               max_steps=steps, task=generation.GENERATION, scheduler=sched)
    return {"train_steps": hist[-1]["steps"], "train_s": round(time.perf_counter() - t, 1),
            "train_loss_last_pass": round(hist[-1]["loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=generation.EVAL_SAMPLES)
    p.add_argument("--steps", type=int, default=generation.SAMPLE_STEPS)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--size", default=",".join(f"{k}={v}" for k, v in DEFAULT_SIZE.items()),
                   help="DiT size as key=value pairs (default: the family's default size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference", action="store_true", help="also FID of real test vs train / noise / blur")
    p.add_argument("--train-steps", type=int, default=0, help="train the DiT this many steps first")
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = os.getloadavg()[0]

    data = load_fashion_mnist(limit=None if args.train_steps else max(args.samples, 1))
    size = {k: (float(v) if "." in v else int(v)) for k, v in (kv.split("=") for kv in args.size.split(","))}
    spec = DIT.spec_for(size, data.io)
    seed_everything(0)
    model = DIT.build(spec).to(device).eval()
    batches = list(iterate_batches(data.val.x[:args.samples], data.val.y[:args.samples], 500, shuffle=False))
    real, labels = generation._collect(batches, args.samples)
    lo = real.amin(dim=(0, 2, 3), keepdim=True)
    span = real.amax(dim=(0, 2, 3), keepdim=True) - lo

    _, load_net = timed(lambda: fid.feature_net(device))
    _, real_stats = timed(lambda: fid.real_statistics((real - lo) / span, device, key=fid.fingerprint(real)))
    fake, sampling = timed(lambda: generation.sample(model, labels, tuple(real.shape[1:]), steps=args.steps,
                                                     guidance=args.guidance, device=device), args.repeats)
    fake01 = ((fake - lo) / span).clamp(0, 1)
    feats, extraction = timed(lambda: fid.features(fake01, device), args.repeats)
    stats = fid.real_statistics((real - lo) / span, device, key=fid.fingerprint(real))
    _, distance = timed(lambda: fid.frechet_distance_to_features(*stats, feats), args.repeats)
    out, evaluation = timed(lambda: generation.evaluate_generation(
        model, batches, device, samples=args.samples, steps=args.steps, guidance=args.guidance), args.repeats)
    extra = reference(data, args.samples) if args.reference else {}
    if args.train_steps:
        extra.update(untrained={k: round(out[k], 4) for k in ("fid", "class_acc", "loss") if k in out})
        extra.update(train(model, data, args.train_steps, args.lr))
        after = generation.evaluate_generation(model, batches, device, samples=args.samples, steps=args.steps,
                                               guidance=args.guidance)
        extra["trained"] = {k: round(after[k], 4) for k in ("fid", "class_acc", "loss") if k in after}
    result = {
        "bench": "fid_cost", "device": str(device), "threads": args.threads, "samples": args.samples,
        "steps": args.steps, "guidance": args.guidance, "dit": spec.label, "patch": spec.patch,
        "dit_gflops_per_image_step": round(spec.flops() / 1e9, 4), "fid_resolution": fid.RESOLUTION,
        "evaluation": evaluation, "sampling": sampling, "feature_extraction": extraction, "frechet": distance,
        "first_call_feature_net_load": load_net, "first_call_real_statistics": real_stats,
        "samples_per_s_sampling": round(args.samples / max(sampling["wall_s"], 1e-9), 1),
        "images_per_s_features": round(args.samples / max(extraction["wall_s"], 1e-9), 1),
        "fid_untrained": round(out["fid"], 2), "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), **extra,
    }
    print(f"one evaluation: {evaluation['wall_s']} s wall ({evaluation['cpu_s']} s CPU) = sampling "
          f"{sampling['wall_s']} s + features {extraction['wall_s']} s + Fréchet {distance['wall_s']} s + judge/loss; "
          f"load average {load_start:.1f} -> {result['loadavg_end']:.1f} on {os.cpu_count()} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
