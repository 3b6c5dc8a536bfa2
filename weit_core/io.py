"""Banks and exported models as safetensors files with a JSON header (safetensors ``__metadata__``).

No pickle anywhere: a file that is not safetensors is refused before anything in it is interpreted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from weit_core.models import TIMM_MODEL, ViTSpec, family_of, get_family
from weit_core.resize import RESIZE_DEFAULTS
from weit_core.templates import KindSpec, LayerGroup, Scalers, TemplateBank

BANK_FORMAT = "weit-bank"
MODEL_FORMAT = "weit-model"
VERSION = 1


class WeitFileError(ValueError):
    """A bank/model file that is missing, corrupt, of the wrong kind or inconsistent with its header."""


def _sniff(path: Path) -> None:
    """Name the common wrong files (pickle, torch.save zip) instead of a parser error."""
    if not path.is_file():
        raise WeitFileError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors = u64 little-endian header length, then the JSON header: its first byte may be 0x80 too
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise WeitFileError(
            f"{path}: looks like a pickle / torch.save file; weit only reads safetensors (pickles are never "
            f"unpickled). Convert it with safetensors.torch.save_file on a machine you trust."
        )


def read_header(path: str | Path, expect_format: str | None = None) -> dict:
    """The weit JSON header of a safetensors file, validated for format and version."""
    path = Path(path)
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeitFileError(f"{path}: not a readable safetensors file ({e}); the file is corrupt or truncated") from e
    if "weit" not in meta:
        raise WeitFileError(f"{path}: safetensors file without a weit header; was it written by weit?")
    try:
        header = json.loads(meta["weit"])
    except json.JSONDecodeError as e:
        raise WeitFileError(f"{path}: weit header is not valid JSON ({e})") from e
    if expect_format and header.get("format") != expect_format:
        raise WeitFileError(f"{path}: is a {header.get('format')!r} file, expected {expect_format!r}")
    if header.get("version") != VERSION:
        raise WeitFileError(f"{path}: header version {header.get('version')} unsupported (this weit reads {VERSION})")
    return header


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeitFileError(f"{path}: tensor data unreadable ({e}); the file is corrupt or truncated") from e


@dataclass
class LoadedBank:
    bank: TemplateBank
    aux_scalers: Scalers | None
    header: dict
    free: dict[str, torch.Tensor] | None = None
    """The aux model's trained free tensors (norms, biases, position table, class token; never its head),
    or None for a bank written before banks carried them (targets then take timm's init for those)."""

    @property
    def resize(self) -> dict:
        return dict(self.header.get("resize") or RESIZE_DEFAULTS)


def save_bank(path: str | Path, bank: TemplateBank, aux_scalers: Scalers | None = None,
              header: dict | None = None, free: dict[str, torch.Tensor] | None = None) -> Path:
    """Templates (+ the auxiliary model's scalers and free tensors, which stage 2 starts from) and a JSON
    header. A classifier head in ``free`` is left out: the head is new for every task."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"templates.{k}": t.detach().cpu().contiguous() for k, t in bank.templates.items()}
    meta = {"format": BANK_FORMAT, "version": VERSION, **bank.config(), **(header or {})}
    if free:
        kept = {k: v for k, v in free.items() if not k.startswith("head.")}
        tensors.update({f"free.{k}": v.detach().cpu().contiguous() for k, v in kept.items()})
        meta["free"] = sorted(kept)
    if aux_scalers is not None:
        tensors.update({f"aux_scalers.{k}": g.detach().cpu().contiguous() for k, g in aux_scalers.grids.items()})
        meta["aux_layout"] = {k: {"names": list(g.names), "shape": list(g.shape)} for k, g in aux_scalers.layout.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"weit": json.dumps(meta, default=str)})
    tmp.replace(path)
    return path


def load_bank(path: str | Path, expect_kinds: dict[str, KindSpec] | None = None) -> LoadedBank:
    """Load and validate a bank: header format, every kind's tensor present with the declared shape,
    and (optionally) the kinds/blocks a target needs."""
    path = Path(path)
    header = read_header(path, BANK_FORMAT)
    try:
        kinds = {k: KindSpec.from_dict(v) for k, v in header["kinds"].items()}
        order = header["order"]
    except (KeyError, TypeError, ValueError) as e:
        raise WeitFileError(f"{path}: bank header lacks valid 'kinds'/'order' ({e})") from e
    tensors = _load_tensors(path)
    bank = TemplateBank(kinds, order)
    for k, spec in kinds.items():
        t = tensors.get(f"templates.{k}")
        if t is None or tuple(t.shape) != spec.template_shape:
            got = None if t is None else tuple(t.shape)
            raise WeitFileError(f"{path}: templates for kind {k!r} should be {spec.template_shape}, found {got}")
        if not torch.isfinite(t).all():
            raise WeitFileError(f"{path}: templates for kind {k!r} contain NaN/inf")
        bank.templates[k].data.copy_(t)
    aux = None
    if "aux_layout" in header:
        layout = {k: LayerGroup(tuple(v["names"]), tuple(v["shape"])) for k, v in header["aux_layout"].items()}
        aux = Scalers(layout, kinds)
        for k, g in aux.grids.items():
            t = tensors.get(f"aux_scalers.{k}")
            if t is None or t.shape != g.shape:
                raise WeitFileError(f"{path}: aux scalers for kind {k!r} should be {tuple(g.shape)}, found "
                                    f"{None if t is None else tuple(t.shape)}")
            g.data.copy_(t)
    free = None
    if header.get("free"):
        missing = [k for k in header["free"] if f"free.{k}" not in tensors]
        if missing:
            raise WeitFileError(f"{path}: header lists free tensors {missing[:3]} that the file lacks")
        free = {k: tensors[f"free.{k}"] for k in header["free"]}
        if "aux_spec" not in header:
            raise WeitFileError(f"{path}: carries free tensors but no aux_spec saying which size they are for")
    if expect_kinds is not None:
        check_bank_kinds(kinds, expect_kinds, str(path))
    return LoadedBank(bank, aux, header, free)


def check_bank_kinds(have: dict[str, KindSpec], need: dict[str, KindSpec], where: str = "bank") -> None:
    """Refuse a bank whose kinds or block sizes differ from what a target/space expects."""
    missing = sorted(set(need) - set(have))
    if missing:
        raise WeitFileError(f"{where}: has no templates for kind(s) {missing}; it has {sorted(have)}")
    for k, spec in need.items():
        h = have[k]
        if (h.a, h.b, h.kernel) != (spec.a, spec.b, spec.kernel):
            raise WeitFileError(
                f"{where}: kind {k!r} has blocks {h.a}x{h.b} kernel {h.kernel}, expected {spec.a}x{spec.b} "
                f"kernel {spec.kernel}; build a bank with the matching --block / patch size"
            )


def save_model(path: str | Path, model: nn.Module, spec: Any, info: dict | None = None) -> Path:
    """An ordinary state_dict plus the family and spec that rebuild it (for a ViT also the timm name and
    kwargs, so ``timm.create_model`` alone can)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": MODEL_FORMAT, "version": VERSION, "family": family_of(spec).name, "spec": spec.to_dict(),
            "info": info or {}}
    if isinstance(spec, ViTSpec):
        meta.update(timm_model=TIMM_MODEL, timm_kwargs=spec.timm_kwargs())
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"weit": json.dumps(meta, default=str)})
    tmp.replace(path)
    return path


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The header's family builds its spec, weights loaded strictly; returns (model, header). Files written
    before models named their family are ViTs."""
    path = Path(path)
    header = read_header(path, MODEL_FORMAT)
    try:
        family = get_family(header.get("family", "vit"))
    except ValueError as e:
        raise WeitFileError(f"{path}: {e} (set WEIT_PLUGINS to the module that registers it)") from e
    try:
        spec = family.spec_from_dict(header["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeitFileError(f"{path}: model header has no valid spec ({e})") from e
    model = family.build(spec)
    try:
        model.load_state_dict(_load_tensors(path), strict=True)
    except RuntimeError as e:
        raise WeitFileError(f"{path}: weights do not match the spec in its header ({e})") from e
    return model.eval(), header


def load_timm_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's plain safetensors checkpoint (no weit header needed) into a timm model, strictly."""
    path = Path(path)
    _sniff(path)
    state = _load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeitFileError(f"{path}: checkpoint does not fit the model ({e})") from e
    return model
