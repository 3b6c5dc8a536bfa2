"""User data as tables: parquet files (or folders of them) whose ``image`` column holds tensors, nested lists
of numbers or PNG/JPEG bytes and whose ``label`` column holds class ids, read into normalized splits. Apart
from ``weit_core.data`` because decoding a user's formats is its own concern; the fixed form Ray Data reads
is ``weit_core.parquet``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from weit_core.data import SPLITS, ArrayDataset, DataNotFoundError, DatasetSplits, split_indices

_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(("_", ".")))
        if not files:
            raise DataNotFoundError(f"no *.parquet files under {path}; give a parquet file or folder")
        return pa.concat_tables([pq.read_table(f) for f in files])
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist; give a parquet file or a folder of parquet files")
    return pq.read_table(path)


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _list_to_numpy(arr: pa.Array, column: str) -> np.ndarray:
    """Peel (nested) list levels off an arrow array; every row must have the same shape."""
    n, shape = len(arr), []
    while _is_list(arr.type):
        if arr.null_count:
            raise ValueError(f"column `{column}` has null images; drop those rows")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"column `{column}`: images of different shapes; resize them all to one size")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise ValueError(f"column `{column}` holds {arr.type}, not numbers")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def _decode_bytes(arr: pa.Array, column: str) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for i, blob in enumerate(arr.to_pylist()):
        if blob is None:
            raise ValueError(f"column `{column}` row {i} is null; drop rows without an image")
        try:
            img = Image.open(io.BytesIO(blob))
            if img.mode == "1":
                img = img.convert("L")
            elif img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            a = np.asarray(img)
        except Exception as e:  # PIL raises several kinds for bad bytes
            raise ValueError(f"column `{column}` row {i}: not a decodable PNG/JPEG image ({e})") from e
        out.append(a if a.ndim == 2 else a.transpose(2, 0, 1))  # HWC -> CHW
    return out


def column_images(table: pa.Table, column: str = "image") -> np.ndarray:
    """The image column as one N×... numpy array, whatever form it was stored in."""
    field = table.schema.field(column)
    typ, meta, chunks = field.type, field.metadata or {}, table.column(column).chunks
    if not chunks:  # an empty table: only a fixed-shape tensor column still knows the image shape
        if isinstance(typ, pa.FixedShapeTensorType):
            return np.zeros((0, *typ.shape), dtype=typ.value_type.to_pandas_dtype())
        raise ValueError(f"column `{column}` is empty; no images to load")
    if isinstance(typ, pa.FixedShapeTensorType):
        return np.concatenate([c.to_numpy_ndarray() for c in chunks])
    if isinstance(typ, pa.ExtensionType):  # e.g. Ray Data's own tensor type, when ray is imported
        shape = getattr(typ, "shape", None)
        flat = np.concatenate([_list_to_numpy(c.storage, column) for c in chunks])
        return flat.reshape(len(flat), *shape) if shape and None not in shape else flat
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        images = [a for c in chunks for a in _decode_bytes(c, column)]
        shapes = sorted({a.shape for a in images})
        if len(shapes) > 1:
            raise ValueError(f"column `{column}`: images of different shapes {shapes}; resize to one size")
        return np.stack(images)
    if not _is_list(typ):
        raise ValueError(f"column `{column}` has type {typ}; store images as a fixed_shape_tensor, "
                         "a (nested) list of numbers, or PNG/JPEG bytes")
    flat = np.concatenate([_list_to_numpy(c, column) for c in chunks])
    # Ray Data writes tensors as a flat list with the shape in the field's extension metadata.
    if meta.get(b"ARROW:extension:name", b"").startswith(b"ray.data.arrow_tensor"):
        shape = json.loads(meta.get(b"ARROW:extension:metadata", b"null"))
        if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
            flat = flat.reshape(len(flat), *shape)
    return flat


def as_nchw(images: np.ndarray, column: str) -> np.ndarray:
    """2D images get one channel; 3D channel-last images (H×W×{1,3,4}) are moved to channel-first."""
    if images.ndim == 3:
        return images.reshape(images.shape[0], 1, *images.shape[1:])
    if images.ndim == 4:
        if images.shape[1] not in (1, 3, 4) and images.shape[3] in (1, 3, 4):
            return images.transpose(0, 3, 1, 2)
        return images
    raise ValueError(f"column `{column}`: each image must be H×W or C×H×W, got shape {images.shape[1:]}")


def _column_labels(table: pa.Table) -> np.ndarray:
    col = table.column("label")
    if not pa.types.is_integer(col.type):
        raise ValueError(f"column `label` must hold integer class ids 0..K-1, got {col.type}; "
                         "map class names to ints")
    if col.null_count:
        raise ValueError("column `label` has nulls; drop unlabeled rows")
    y = col.to_numpy().astype(np.int64)
    if len(y) and y.min() < 0:
        raise ValueError(f"column `label` has negative values (min {y.min()}); class ids must be 0..K-1")
    return y


def load_parquet(path: str | Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> DatasetSplits:
    """User data: columns ``image`` and ``label`` (optional ``split``). Normalized per channel by the train
    split's mean/std, so any image format lands on the same scale. A ``split`` column is honoured; a split it
    leaves empty (val or test) is carved from train by the fractions."""
    table = read_table(path)
    for col, fix in (("image", "an image per row (tensor, list of numbers, or PNG/JPEG bytes)"),
                     ("label", "integer class ids 0..K-1")):
        if col not in table.column_names:
            raise ValueError(f"{path}: no `{col}` column (have {table.column_names}); "
                             f"add a `{col}` column with {fix}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows; the `image` and `label` columns are empty")
    raw = as_nchw(column_images(table), "image")
    x = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0)
    y = _column_labels(table)
    if "split" in table.column_names:
        values = np.asarray(table.column("split").to_pylist(), dtype=object)
        unknown = sorted({str(v) for v in values} - set(_SPLIT_ALIASES))
        if unknown:
            raise ValueError(f"column `split` has unknown values {unknown}; use train / val / test "
                             "(or drop the column for a seeded split)")
        values = np.array([_SPLIT_ALIASES[v] for v in values])
        parts = {s: np.flatnonzero(values == s) for s in SPLITS}
        if not len(parts["train"]):
            raise ValueError("column `split` has no `train` rows; mark some rows train (or drop the column)")
        rng = np.random.default_rng(seed)
        for s, frac in (("val", val_fraction), ("test", test_fraction)):
            if not len(parts[s]):
                train = rng.permutation(parts["train"])
                k = max(1, round(len(train) * frac)) if frac > 0 else 0
                if k >= len(train):
                    raise ValueError(f"too few train rows ({len(train)}) to carve a `{s}` split; "
                                     f"add `{s}` rows")
                parts[s], parts["train"] = np.sort(train[:k]), np.sort(train[k:])
    else:
        parts = split_indices(len(y), val_fraction, test_fraction, seed)
    mean = x[parts["train"]].mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = x[parts["train"]].std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    x = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    splits = {s: ArrayDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx])) for s, idx in parts.items()}
    return DatasetSplits(Path(path).stem, splits["train"], splits["val"], splits["test"],
                         num_classes=int(y.max()) + 1)
