"""Bank and model files: safetensors + JSON header round trips, and refusal of bad files."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from weit_core.io import WeitFileError, load_bank, load_model, read_header, save_bank, save_model
from weit_core.models import TIMM_MODEL, ViTSpec, create_vit, vit_kinds, vit_layout
from weit_core.templates import KindSpec, Scalers, TemplateBank

SPEC = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)


@pytest.fixture
def bank_file(tmp_path):
    kinds = vit_kinds(SPEC, n=3, block=16)
    bank, aux = TemplateBank(kinds), Scalers(vit_layout(SPEC), kinds)
    path = save_bank(tmp_path / "bank.safetensors", bank, aux, {"mode": "wave", "source": {"spec": SPEC.to_dict()}})
    return path, bank, aux


def test_bank_round_trip(bank_file):
    path, bank, aux = bank_file
    loaded = load_bank(path, expect_kinds=vit_kinds(SPEC, 3, 16))
    assert loaded.header["mode"] == "wave" and loaded.header["kinds"]["qkv"]["n"] == 3
    for k, t in bank.templates.items():
        assert torch.equal(loaded.bank.templates[k], t.detach())
        assert torch.equal(loaded.aux_scalers.grids[k], aux.grids[k].detach())
    assert loaded.aux_scalers.layout == aux.layout


def test_exported_model_loads_in_timm_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_vit(SPEC).eval()
    path = save_model(tmp_path / "m.safetensors", model, SPEC, {"strategy": "scratch"})
    header = read_header(path)
    fresh = timm.create_model(header["timm_model"], pretrained=False, **header["timm_kwargs"]).eval()
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)
    loaded, hdr = load_model(path)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert hdr["timm_model"] == TIMM_MODEL and hdr["info"]["strategy"] == "scratch"


def test_truncated_bank_is_refused(bank_file, tmp_path):
    path = bank_file[0]
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeitFileError, match="corrupt or truncated"):
        load_bank(bad)


def test_corrupt_header_is_refused(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeitFileError, match="corrupt or truncated"):
        load_bank(bad)


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bank.safetensors"
    bad.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(WeitFileError, match="pickle"):
        load_bank(bad)
    assert not marker.exists()
    torch.save({"templates": torch.zeros(2)}, tmp_path / "t.pt")
    with pytest.raises(WeitFileError, match="pickle"):
        load_bank(tmp_path / "t.pt")


def test_wrong_kind_of_file_and_mismatched_bank(bank_file, tmp_path):
    path = bank_file[0]
    model_path = save_model(tmp_path / "m.safetensors", create_vit(SPEC), SPEC)
    with pytest.raises(WeitFileError, match="is a 'weit-model' file, expected 'weit-bank'"):
        load_bank(model_path)
    with pytest.raises(WeitFileError, match="kind 'qkv' has blocks 16x16.*expected 32x32"):
        load_bank(path, expect_kinds={"qkv": KindSpec(3, 32, 32)})
    with pytest.raises(WeitFileError, match=r"no templates for kind\(s\) \['conv'\]"):
        load_bank(path, expect_kinds={"conv": KindSpec(3, 16, 16)})
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(WeitFileError, match="without a weit header"):
        load_bank(plain)
    with pytest.raises(WeitFileError, match="no such file"):
        load_bank(tmp_path / "missing.safetensors")


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 (a pickle's first
    byte) in 1 of 256 files. Such a file (first seen as a real bank) must still load."""
    spec = ViTSpec(depth=1, width=16, heads=1, patch=2, img_size=4, in_chans=1, num_classes=2)
    model = create_vit(spec)
    for pad in range(512):
        path = save_model(tmp_path / "m.safetensors", model, spec, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    loaded, header = load_model(path)
    assert header["info"]["pad"] == "x" * pad
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
