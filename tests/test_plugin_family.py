"""A new architecture family is one file: this test file registers a residual-MLP family (``toy_mlp``) on
weit's registry and, with nothing under ``pipelines/`` knowing it, distills a bank for it, initializes it
with every strategy that declares it, and sweeps it end to end through ``weit sweep`` (the CLI's Ray workers
import this module through ``$WEIT_PLUGINS``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from weit_core.models.family import Family, register_family
from weit_core.resize import SizeMaps, axis_map, resize_grid, resize_stack, resize_tensor
from weit_core.templates import KindSpec, LayerGroup, Layout

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the family


@dataclass(frozen=True)
class MLPSpec:
    depth: int
    width: int
    in_features: int = 64
    num_classes: int = 10

    @property
    def label(self) -> str:
        return f"{self.depth}x{self.width}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MLPSpec:
        return cls(**d)

    def num_params(self) -> int:
        w = self.width
        return self.in_features * w + w + self.depth * (w * w + 3 * w) + self.num_classes * (w + 1)

    def flops(self) -> int:
        return 2 * (self.in_features * self.width + self.depth * self.width**2 + self.width * self.num_classes)


class ResidualMLP(nn.Module):
    """Flatten -> stem -> depth x (x + fc(gelu(norm(x)))) -> head."""

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.stem = nn.Linear(spec.in_features, spec.width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(spec.width),
                                                   "fc": nn.Linear(spec.width, spec.width)})
                                    for _ in range(spec.depth))
        self.head = nn.Linear(spec.width, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # timm's protocol: features, then the head
        x = self.stem(x.flatten(1))
        for b in self.blocks:
            x = x + b["fc"](nn.functional.gelu(b["norm"](x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(spec: MLPSpec, init_mode: str = "", head_seed: int | None = None) -> ResidualMLP:
    model = ResidualMLP(spec)
    if head_seed is not None:  # every new head from its own stream, as the built-in families do
        gen = torch.Generator().manual_seed(0x68656164_0000 + head_seed)
        with torch.no_grad():
            model.head.weight.normal_(0, 0.02, generator=gen)
            model.head.bias.zero_()
    return model


def layout(spec: MLPSpec) -> Layout:
    return {"fc": LayerGroup(tuple(f"blocks.{i}.fc.weight" for i in range(spec.depth)), (spec.width, spec.width))}


def kinds(spec: MLPSpec, n: int = 4, block: int = 16) -> dict[str, KindSpec]:
    return {"fc": KindSpec(n, block, block)}


E = ((0, "embed", 1),)
FREE = {"stem.weight": E, "stem.bias": E, "head.weight": ((1, "embed", 1),), "head.bias": ()}
BLOCK_FREE = {"norm.weight": E, "norm.bias": E, "fc.bias": E}


def free_names(spec: MLPSpec, head: bool = False) -> list[str]:
    names = [n for n in FREE if head or not n.startswith("head.")]
    return names + [f"blocks.{i}.{s}" for i in range(spec.depth) for s in BLOCK_FREE]


def size_maps(src: MLPSpec, dst: MLPSpec, block: int, width_rule: str = "nested",
              depth_rule: str = "nested") -> SizeMaps:
    return SizeMaps(depth=axis_map(src.depth, dst.depth, depth_rule),
                    roles={"embed": axis_map(src.width // block, dst.width // block, width_rule)}, block=block)


def resize_grids(grids: dict[str, torch.Tensor], maps: SizeMaps) -> dict[str, torch.Tensor]:
    return {k: resize_grid(g, ((0, "embed", 1), (1, "embed", 1)), maps, True) for k, g in grids.items()}


def resize_free(free: dict[str, torch.Tensor], src: MLPSpec, maps: SizeMaps, head: bool = False) -> dict:
    out = {n: resize_tensor(free[n], axes, maps) for n, axes in FREE.items() if head or not n.startswith("head.")}
    for suffix, axes in BLOCK_FREE.items():
        made = resize_stack([free[f"blocks.{i}.{suffix}"] for i in range(src.depth)], axes, maps)
        out.update({f"blocks.{i}.{suffix}": t for i, t in enumerate(made)})
    return out


def check_size(size: dict, block: int | None = None) -> str | None:
    return "not_multiple_of_block" if block and size["width"] % block else None


def make_spec(size: dict, io: dict) -> MLPSpec:
    return MLPSpec(depth=size["depth"], width=size["width"], num_classes=io["num_classes"],
                   in_features=io["in_chans"] * io["img_size"] ** 2)


def spec_of_model(model: ResidualMLP) -> MLPSpec:
    return MLPSpec(depth=len(model.blocks), width=model.stem.out_features, in_features=model.stem.in_features,
                   num_classes=model.head.out_features)


TOY = register_family(Family(
    name="toy_mlp", spec_type=MLPSpec, build=build, layout=layout, kinds=kinds, free_names=free_names,
    size_maps=size_maps, resize_grids=resize_grids, resize_free=resize_free, size_axes=("depth", "width"),
    make_spec=make_spec, check_size=check_size,
    drop_reasons={"not_multiple_of_block": "width is not a multiple of the bank's template block"},
    spec_of_model=spec_of_model))


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def toy_bank(digits, tmp_path_factory):
    """An ancestry (2x32) and a WAVE bank over depths 1-2 x widths 16-32, distilled in-process."""
    from weit_core.io import save_model
    from weit_core.stage1 import build_elastic, make_bank, save_elastic
    from weit_core.train import fit, iterate_batches, make_optimizer, seed_everything

    d = tmp_path_factory.mktemp("toy")
    ref = MLPSpec(depth=2, width=32)
    seed_everything(0)
    anc = build(ref)
    x, y = digits.train.x, digits.train.y
    fit(anc, lambda ep: iterate_batches(x, y, 32, seed=ep), make_optimizer(anc, 3e-3), epochs=6)
    save_model(d / "anc.safetensors", anc, ref, {})
    sizes = [MLPSpec(depth=a, width=w) for a in (1, 2) for w in (16, 32)]
    elastic = build_elastic(TOY, ref, n=4, block=16)
    make_bank(elastic, x, y, sizes=sizes, teacher=anc, epochs=6, lr=3e-3, batch_size=32)
    save_elastic(d / "bank.safetensors", elastic, {}, sizes)
    return d, anc, elastic


def test_the_registry_knows_the_family_and_its_sizes():
    from weit_core.models.family import family_of, get_family

    assert get_family("toy_mlp") is TOY and family_of(MLPSpec(1, 16)) is TOY
    assert TOY.check_size({"depth": 1, "width": 24}, 16) == "not_multiple_of_block"
    spec = TOY.make_spec({"depth": 2, "width": 32}, {"in_chans": 1, "img_size": 8, "num_classes": 10})
    assert sum(p.numel() for p in build(spec).parameters()) == spec.num_params()


def test_wave_at_the_aux_size_is_the_aux_and_beats_the_random_bank(toy_bank, digits):
    """Strategies reach a new family through the registry alone: wave at the bank's reference size computes
    the aux model's features exactly, and inside the trained range it scores far above a random bank."""
    from weit_core.io import load_bank
    from weit_core.strategies import init_model
    from weit_core.train import evaluate, iterate_batches

    d, _, elastic = toy_bank
    bank = load_bank(d / "bank.safetensors")
    ref = elastic.ref_spec
    model = init_model("wave", ref, bank=bank, fit_steps=0, seed=0).model
    aux = build(ref)
    aux.load_state_dict({k: v.detach() for k, v in elastic.state_for(ref).items()})
    x = digits.val.x[:64]
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), aux.eval().forward_features(x))

    small = MLPSpec(depth=1, width=16)
    fit_data = (digits.train.x[:256], digits.train.y[:256])
    accs = {name: evaluate(init_model(name, small, bank=bank, fit_data=fit_data, seed=0, fit_steps=40).model,
                           iterate_batches(digits.test.x, digits.test.y, 256, shuffle=False))["acc"]
            for name in ("wave", "wave_random_bank")}
    assert accs["wave"] > 0.5 and accs["wave"] > accs["wave_random_bank"] + 0.05, accs


def test_weit_sweep_runs_the_family_without_pipelines_knowing_it(toy_bank, tmp_path):
    d, _, _ = toy_bank
    space = tmp_path / "toy.yaml"
    space.write_text(
        "name: toy\nfamily: toy_mlp\ntasks: [{data: digits}]\n"
        "strategies: [scratch, scratch_fit, wave, wave_random_bank]\n"
        "sizes: {depth: [1, 2], width: [16, 24, 32]}\n"
        "training: {epochs: 2, batch_size: 64, lr: 0.002, fit_steps: 20, fit_examples: 256, seeds: [0]}\n")
    env = {**os.environ, "WEIT_PLUGINS": Path(__file__).stem,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "sweep", "--space", str(space), "--bank", str(d / "bank.safetensors"),
         "--storage", str(tmp_path / "tune"), "--mlflow-uri", uri, "--cpus-per-trial", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("weit-sweep")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("weit.strategy")]
    # width 24 is no multiple of the bank's block 16: dropped before trials, so 2 depths x 2 widths x 4 strategies
    assert len(runs) == 16, json.dumps([r.info.run_name for r in runs])
    assert all(r.info.status == "FINISHED" for r in runs)
    best = {}
    for r in runs:
        s = r.data.tags["weit.strategy"]
        best[s] = max(best.get(s, 0.0), r.data.metrics["val_acc"])
    assert best["wave"] > best["scratch"], best
