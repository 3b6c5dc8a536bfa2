"""Datasets as plain tensors: built-ins (Fashion-MNIST, digits) and user parquet (the form Ray Data reads is
``weit_core.parquet``). Everything is loaded eagerly and normalized once, so every strategy and baseline sees
exactly the same numbers; nothing here imports Ray or MLflow."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUILTIN_DATASETS: tuple[str, ...] = ("fashion_mnist", "digits", "digits28")

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Fixed constants (the usual Fashion-MNIST train-set values) so a subset or a `limit` never shifts the inputs.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# scikit-learn digits after /16, over all 1797 images; fixed for the same reason.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """Data files are missing; the message says how to get them."""


@dataclass
class ArrayDataset:
    """One split, already normalized: ``x`` float32 with N rows of any shape (images N×C×H×W, a policy's state
    contexts N×K×obs_dim), ``y`` int64 N (a class, a discrete action) or float32 N×... (a continuous action):
    integer targets stay int64, floating ones become float32."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        self.x = torch.as_tensor(self.x, dtype=torch.float32)
        self.y = torch.as_tensor(self.y)
        self.y = self.y.to(torch.float32 if self.y.is_floating_point() else torch.int64)
        if self.x.ndim < 2 or self.y.ndim < 1 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset wants x N×... (N rows of some shape) and y N or N×..., got x "
                             f"{tuple(self.x.shape)} and y {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int, seed: int = 0) -> ArrayDataset:
        """``n`` rows drawn without replacement, the same for the same seed (all rows if ``n >= len``);
        kept in their original order so a subset of a subset stays predictable."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        t = torch.from_numpy(idx)
        return ArrayDataset(self.x[t], self.y[t])


@dataclass
class DatasetSplits:
    """A whole dataset, split once, so every strategy is trained and scored on the same rows.

    ``io`` is what a family's ``make_spec(size, io)`` needs: derived for images (4-D ``x``: ``in_chans``,
    ``img_size`` (``[h, w]`` when not square), ``num_classes``); set explicitly by non-image data (a control
    task's ``obs_dim``, ``act_dim``, ...)."""

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int = 0
    io: dict | None = None

    def __post_init__(self) -> None:
        if self.io is None:
            if self.train.x.ndim != 4:
                raise ValueError(f"dataset {self.name!r}: rows of shape {tuple(self.train.x.shape[1:])} are not "
                                 "images, so its io cannot be derived; pass io={...} (what the family's "
                                 "make_spec needs)")
            self.io = self.image_io(self.input_shape, self.num_classes)

    @staticmethod
    def image_io(shape: tuple[int, ...], num_classes: int) -> dict:
        """The ``io`` of C×H×W images with ``num_classes`` classes."""
        c, h, w = (int(d) for d in shape)
        return {"in_chans": c, "img_size": h if h == w else [h, w], "num_classes": int(num_classes)}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row's shape: C×H×W for images."""
        return tuple(int(d) for d in self.train.x.shape[1:])

    def describe(self) -> dict:
        """Flat facts for run params/tags."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": self.input_shape,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
        }


# IDX / Fashion-MNIST ----------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) with numpy; a bad header or short payload is a ValueError, not a
    silently mis-shaped array."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable gzip file ({e}); re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'}; is this an IDX file?")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes, header {dims} says {expected}; "
                         "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The first folder holding all four official files: ``root``, then ``$WEIT_DATA``, then the Debian
    package's folder."""
    candidates = [Path(p) for p in (root, os.environ.get("WEIT_DATA"), DEFAULT_FASHION_MNIST_DIR) if p]
    for folder in candidates:
        if all(_idx_file(folder, stem) for stem in FASHION_MNIST_FILES.values()):
            return folder
    searched = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"Fashion-MNIST not found (searched: {searched}). Fix: `sudo apt-get install dataset-fashion-mnist`, "
        "or put the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and set WEIT_DATA=<folder>."
    )


@functools.lru_cache(maxsize=2)
def _fashion_raw(folder: str) -> dict[str, np.ndarray]:
    """Decompressing 30 MB takes a moment; tests and sweeps load the same files many times."""
    arrays = {key: read_idx(_idx_file(Path(folder), stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for arr in arrays.values():
        arr.setflags(write=False)
    return arrays


def _fashion_split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> ArrayDataset:
    x = images[idx].astype(np.float32).reshape(len(idx), 1, *images.shape[1:]) / 255.0
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(labels[idx].astype(np.int64)))


def load_fashion_mnist(root: str | Path | None = None, *, val_size: int = 5000, seed: int = 0,
                       limit: int | None = None) -> DatasetSplits:
    """Official 60k train split into train/val by ``seed``; official 10k test. ``limit`` caps every split
    (first rows after the seeded shuffle; the test split is shuffled only when limited)."""
    raw = _fashion_raw(str(find_fashion_mnist(root)))
    n = len(raw["train_labels"])
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    test_idx = np.arange(len(raw["test_labels"]))
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        train_idx, val_idx, test_idx = train_idx[:limit], val_idx[:limit], rng.permutation(test_idx)[:limit]
    return DatasetSplits(
        name="fashion_mnist",
        train=_fashion_split(raw["train_images"], raw["train_labels"], train_idx),
        val=_fashion_split(raw["train_images"], raw["train_labels"], val_idx),
        test=_fashion_split(raw["test_images"], raw["test_labels"], test_idx),
        num_classes=10,
    )


# digits -----------------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("need 0 <= val_fraction, test_fraction and their sum < 1, "
                         f"got {val_fraction}, {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n - n_val - n_test <= 0:
        raise ValueError(f"{n} rows leave no training rows with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}


def load_digits(*, seed: int = 0, img_size: int = 8) -> DatasetSplits:
    """scikit-learn's bundled 8×8 digits (no download): the fast real dataset for tests; 70/15/15 by seed.

    ``img_size=28`` upsamples them bilinearly to Fashion-MNIST's size (``digits28``): a real task on
    another domain that a Fashion-MNIST bank or ancestry can be tried on."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(((bunch.images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD).reshape(-1, 1, 8, 8))
    if img_size != 8:
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    parts = split_indices(len(y), 0.15, 0.15, seed)
    train, val, test = (ArrayDataset(x[torch.from_numpy(parts[s])], y[torch.from_numpy(parts[s])]) for s in SPLITS)
    return DatasetSplits("digits" if img_size == 8 else f"digits{img_size}", train, val, test, num_classes=10)


def load_dataset(name_or_path: str, **kwargs) -> DatasetSplits:
    """A built-in by name, else a parquet file or folder; ``kwargs`` go to the loader."""
    key = str(name_or_path).strip().lower().replace("-", "_")
    if key == "fashion_mnist":
        return load_fashion_mnist(**kwargs)
    if key == "digits":
        return load_digits(**kwargs)
    if key == "digits28":
        return load_digits(img_size=28, **kwargs)
    path = Path(name_or_path)
    if path.is_dir() or path.suffix == ".parquet" or path.exists():
        from weit_core.tables import load_parquet

        return load_parquet(path, **kwargs)
    raise ValueError(f"unknown dataset {name_or_path!r}: use one of {', '.join(BUILTIN_DATASETS)}, "
                     "or a path to a parquet file / folder of parquet files with `image` and `label` columns")


def limit_splits(splits: DatasetSplits, limit: int, seed: int = 0) -> DatasetSplits:
    """At most ``limit`` rows per split (seeded), the rule ``load_fashion_mnist(limit=)`` applies."""
    from dataclasses import replace

    return replace(splits, train=splits.train.subset(limit, seed), val=splits.val.subset(limit, seed),
                   test=splits.test.subset(limit, seed))


def load_splits(dataset: str, limit: int | None = None, seed: int = 0) -> DatasetSplits:
    """:func:`load_dataset` with at most ``limit`` rows per split (Fashion-MNIST takes them while loading)."""
    if str(dataset).replace("-", "_").lower() == "fashion_mnist":
        return load_fashion_mnist(limit=limit, seed=seed)
    splits = load_dataset(dataset)
    return limit_splits(splits, limit, seed) if limit else splits
