"""The parquet form Ray Data reads: one split per file, a fixed-shape tensor ``image`` column (any row shape:
images, a policy's state contexts) and a ``label`` column (int64 class ids / discrete actions, or float32
targets, a fixed-shape tensor when each row is more than one number). Workers on other nodes read these
files, never driver memory; nothing here imports Ray."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from weit_core.data import SPLITS, ArrayDataset, DatasetSplits, load_splits
from weit_core.tables import as_nchw, column_images, read_table

PARQUET_ROW_GROUP = 4096
IO_FILE = "io.json"
"""Beside the split files of non-image data: what a family's ``make_spec`` needs (images derive it)."""


def _tensor(a: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """numpy -> torch without a copy where possible; arrow and Ray hand out read-only buffers, which torch
    warns about (and must not write into), so those are copied."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _tensor_column(a: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """N×... numpy -> a fixed-shape tensor column, built from the flat buffer: ``from_numpy_ndarray`` infers a
    dim permutation from strides, and size-1 dims (C=1) can carry any stride, which silently stores shape
    (H, 1, W) plus a permutation."""
    storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=value_type), int(np.prod(a.shape[1:])))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, a.shape[1:]), storage)


def to_parquet(ds: ArrayDataset, path: str | Path, *, split: str | None = None) -> Path:
    """One split as parquet: ``image`` a fixed-shape tensor column (Ray Data's read_parquet turns it straight
    into N×... numpy batches), ``label`` int64 or float32 (a tensor column when rows are not scalars). A
    ``split`` column is for ``load_parquet``; drop it (``select_columns``) before ``iter_torch_batches``,
    which cannot convert strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(ds.x.detach().cpu().numpy(), dtype=np.float32)
    y = ds.y.detach().cpu().numpy()
    y_type = pa.float32() if np.issubdtype(y.dtype, np.floating) else pa.int64()
    y = np.ascontiguousarray(y, dtype=y_type.to_pandas_dtype())
    columns = {"image": _tensor_column(x, pa.float32()),
               "label": pa.array(y, type=y_type) if y.ndim == 1 else _tensor_column(y, y_type)}
    if split is not None:
        columns["split"] = pa.array([split] * len(ds), type=pa.string())
    pq.write_table(pa.table(columns), path, row_group_size=PARQUET_ROW_GROUP)
    return path


def export_parquet(splits: DatasetSplits, out_dir: str | Path) -> dict[str, Path]:
    """``out_dir/{train,val,test}.parquet`` with only ``image`` and ``label`` (a string ``split`` column would
    make Ray Data's ``iter_torch_batches`` fail), plus ``io.json`` for non-image data."""
    out_dir = Path(out_dir)
    paths = {s: to_parquet(getattr(splits, s), out_dir / f"{s}.parquet") for s in SPLITS}
    if splits.train.x.ndim != 4:
        (out_dir / IO_FILE).write_text(json.dumps(splits.io))
    return paths


def _column_values(table: pa.Table, column: str) -> np.ndarray:
    typ = table.schema.field(column).type
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        return table.column(column).to_numpy()
    return column_images(table, column)


def read_parquet_arrays(path: str | Path) -> ArrayDataset:
    """Inverse of :func:`to_parquet`: the stored values as they are (no scaling, no normalizing). Columns
    without a stored row shape (plain lists) are read as images (H×W gets a channel)."""
    table = read_table(path)
    x = column_images(table)
    if not isinstance(table.schema.field("image").type, pa.FixedShapeTensorType):
        x = as_nchw(x, "image")
    y = _column_values(table, "label")
    return ArrayDataset(_tensor(x, np.float32), _tensor(y, np.float32 if y.dtype.kind == "f" else np.int64))


def batch_to_tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ray Data numpy batch -> (float32 B×..., int64 B or float32 B×...), shapes as stored. Ray gives
    fixed-shape tensor columns as one ndarray, ragged or pickled ones as an object array of per-row arrays;
    both are accepted."""
    out = []
    for column in ("image", "label"):
        a = batch[column]
        if a.dtype == object:
            if not len(a):
                raise ValueError(f"empty batch: no `{column}` rows")
            a = np.stack([np.asarray(v) for v in a])
        out.append(a)
    x, y = out
    if x.ndim < 2:
        raise ValueError(f"batch `image` must have a row shape (B×...), got shape {x.shape}")
    return _tensor(x, np.float32), _tensor(y, np.float32 if y.dtype.kind == "f" else np.int64)


@dataclass
class PreparedData:
    """Parquet files Ray Data reads (train, test) plus what a header records about the data."""

    paths: dict[str, str]
    info: dict
    input_shape: tuple[int, ...]
    num_classes: int
    train_rows: int
    io: dict | None = None
    """What a family's ``make_spec`` needs (``DatasetSplits.io``)."""


Loader = Callable[[str | None, int | None, int], DatasetSplits]


def prepare_parquet(dataset: str, out_dir: Path, limit: int | None = None, seed: int = 0,
                    load: Loader | None = None) -> PreparedData:
    """Parquet files for Ray Data. A folder already holding ``train.parquet`` + ``test.parquet``
    (:func:`export_parquet`) is read as it is; anything else is loaded with ``load`` (a task's
    ``(dataset, limit, seed)`` loader; default ``load_splits``) and exported into ``out_dir`` once."""
    folder = Path(str(dataset))
    if folder.is_dir() and (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
        if limit:
            raise ValueError(f"--limit does not apply to the ready parquet folder {folder}; export a smaller one")
        return describe_parquet(folder, dataset)
    source = {"dataset": str(dataset), "limit": limit, "seed": seed}
    marker = Path(out_dir) / "source.json"
    if marker.is_file():  # exported by an earlier run of this job
        before = json.loads(marker.read_text())
        if {k: before.get(k) for k in source} == source:
            return describe_parquet(Path(out_dir), dataset, name=before.get("name"), limit=limit)
    splits = (load or load_splits)(dataset, limit, seed)
    export_parquet(splits, out_dir)
    marker.write_text(json.dumps({**source, "name": splits.name}))
    return describe_parquet(Path(out_dir), dataset, name=splits.name, limit=limit)


def describe_parquet(folder: Path, source: str, name: str | None = None, limit: int | None = None) -> PreparedData:
    """Rows, row shape, classes and ``io`` from parquet metadata, the label column and ``io.json`` (no image
    decoding). Images (C×H×W rows) derive ``io``; other data must carry ``io.json``."""
    paths = {s: str(folder / f"{s}.parquet") for s in SPLITS if (folder / f"{s}.parquet").is_file()}
    typ = pq.read_schema(paths["train"]).field("image").type
    if not isinstance(typ, pa.FixedShapeTensorType):
        raise ValueError(f"{paths['train']}: `image` is {typ}, not a tensor column; write the folder with "
                         f"weit_core.parquet.export_parquet")
    shape = tuple(int(d) for d in typ.shape)
    labels = {s: pq.read_table(p, columns=["label"]).column("label") for s, p in paths.items()}
    integer = pa.types.is_integer(labels["train"].type)
    num_classes = int(max(int(pc.max(v).as_py()) for v in labels.values() if len(v)) + 1) if integer else 0
    io_file = folder / IO_FILE
    if io_file.is_file():
        io = json.loads(io_file.read_text())
        num_classes = int(io.get("num_classes", num_classes))
    elif len(shape) == 3:
        io = DatasetSplits.image_io(shape, num_classes)
    else:
        raise ValueError(f"{folder}: rows of shape {shape} are not images and there is no {IO_FILE}; write the "
                         f"folder with weit_core.parquet.export_parquet")
    info = {"name": name or folder.name, "source": source, "limit": limit, "input_shape": list(shape),
            "num_classes": num_classes, **{s: len(v) for s, v in labels.items()}}
    return PreparedData(paths, info, shape, num_classes, len(labels["train"]), io)

