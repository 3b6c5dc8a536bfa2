"""`weit ancestry`, `weit distill` and `weit data` beyond the ViT: a ConvNeXt ancestry trained in process on
real Fashion-MNIST rows, a bank distilled from it on Ray Train whose kinds are ConvNeXt's, a ConvNeXt size
range, a task kind's data maker, and the one-line errors for a size key or family that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.distill import DistillConfig, plan_range
from weit_core.io import load_bank, load_model, read_header
from weit_core.models import CONVNEXT, ConvNeXtSpec
from weit_core.parquet import export_parquet
from weit_core.tasks import CLASSIFICATION, register_kind

CHANCE = 0.1  # ten classes
CX = ["--family", "convnext", "--size", "depth=1,width=16"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("any_family")


@pytest.fixture(scope="module")
def convnext_ancestry(work, fmnist_dir) -> Path:
    out = work / "cx.safetensors"
    assert main(["ancestry", *CX, "--limit", "1000", "--epochs", "2", "--lr", "3e-3", "--batch-size", "64",
                 "--out", str(out), "--mlflow-uri", f"sqlite:///{work / 'ml.db'}"]) == 0
    return out


def one_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_convnext_ancestry_is_a_convnext_that_learned(convnext_ancestry):
    model, header = load_model(convnext_ancestry)
    assert header["family"] == "convnext" and isinstance(CONVNEXT.spec_from_dict(header["spec"]), ConvNeXtSpec)
    spec = CONVNEXT.spec_from_dict(header["spec"])
    assert (spec.depths, spec.dims, spec.patch) == ((1, 1), (16, 32), 2)  # the family's default stages and patch
    assert header["info"]["metrics"]["test_acc"] > CHANCE + 0.15, header["info"]["metrics"]


def test_distill_from_a_convnext_teacher_makes_a_convnext_bank(convnext_ancestry, work, ray_session):
    out = work / "cx_bank.safetensors"
    assert main(["distill", "--teacher", str(convnext_ancestry), "--limit", "300", "--epochs", "1",
                 "--n-templates", "4", "--batch-size", "64", "--workers", "1", "--cpus-per-worker", "1",
                 "--storage", str(work / "runs"), "--out", str(out), "--mlflow-uri", f"sqlite:///{work / 'ml.db'}"]) == 0
    bank = load_bank(out)
    teacher = CONVNEXT.spec_from_dict(read_header(convnext_ancestry)["spec"])
    assert bank.header["family"] == "convnext" and bank.header["aux_spec"] == teacher.to_dict()
    assert set(bank.bank.templates) == set(CONVNEXT.kinds(teacher, 4, 16))


def test_a_convnext_range_is_planned_by_its_family(work, digits):
    data_dir = work / "digits_pq"
    export_parquet(digits, data_dir)
    from weit_core.parquet import describe_parquet

    data = describe_parquet(data_dir, "digits")
    plan = plan_range(DistillConfig(family="convnext", depths=[1, 2], widths=[16, 32], aux={"patch": 1}), data)
    assert all(isinstance(s, ConvNeXtSpec) for s in plan.sizes) and len(plan.sizes) == 4
    assert (plan.ref.depths, plan.ref.dims) == ((2, 2), (32, 64))  # the largest: every size is a sub-model of it
    assert plan.sizes[0].dims == (16, 32) and plan.sizes == sorted(plan.sizes, key=lambda s: s.num_params())
    with pytest.raises(Exception, match="convnext sizes have no heads; drop --head-dim"):
        plan_range(DistillConfig(family="convnext", widths=[16, 32], head_dim=16), data)
    weit = plan_range(DistillConfig(family="convnext"), data)  # no teacher, no range: the family's default size
    assert not weit.sizes and (weit.ref.depths, weit.ref.dims, weit.ref.patch) == ((4, 4), (32, 64), 2)
    with pytest.raises(ValueError, match="the teacher is a convnext but --family is vit"):
        DistillConfig(family="vit").aux_family(CLASSIFICATION, weit.ref)


@pytest.mark.parametrize("command", ["ancestry", "distill"])
def test_bad_size_key_and_unknown_family_are_one_line(command, work, capsys):
    out = ["--dataset", "digits", "--epochs", "1", "--out", str(work / f"bad_{command}.safetensors"),
           "--storage", str(work / "runs")] if command == "distill" else ["--dataset", "digits", "--epochs", "1",
                                                                         "--out", str(work / "bad.safetensors")]
    line = one_error([command, "--family", "convnext", "--size", "depth=1,heads=2", *out], capsys)
    assert re.search(r"'heads' is not a convnext size key; convnext sizes set depth, width, stages", line), line
    line = one_error([command, "--family", "vitt", *out], capsys)
    assert re.search(r"unknown architecture family 'vitt'; available: .*convnext.*vit", line), line


def test_axis_option_the_family_lacks_is_one_line(work, capsys):
    line = one_error(["ancestry", "--family", "convnext", "--heads", "2", "--dataset", "digits",
                      "--out", str(work / "h.safetensors")], capsys)
    assert "--heads is no convnext size key" in line and "--size key=value" in line


WRITTEN: list[tuple] = []


def _make_rows(arg: str, *, out: str, episodes: int | None, seed: int) -> Path:
    WRITTEN.append((arg, out, episodes, seed))
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


register_kind("test_maker", lambda arg: None, _make_rows)  # the data maker's wiring only


def test_data_kind_calls_the_kinds_maker(work, capsys):
    assert main(["data", "test_maker:Env-v1", "--out", str(work / "eps"), "--episodes", "3", "--seed", "7"]) == 0
    assert WRITTEN[-1] == ("Env-v1", str(work / "eps"), 3, 7) and str(work / "eps") in capsys.readouterr().out
    line = one_error(["data", "nokind:Env-v1", "--out", str(work / "eps")], capsys)
    assert "no task kind 'nokind' makes data; kinds that do: " in line and "test_maker" in line
