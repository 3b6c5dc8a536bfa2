"""Data loading on real data: digits (bundled), Fashion-MNIST (Debian package), user parquet in every
supported image form, and the numpy batches Ray Data hands to workers."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from weit_core import data
from weit_core.data import (
    ArrayDataset,
    DataNotFoundError,
    DatasetSplits,
    find_fashion_mnist,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from weit_core.parquet import (
    batch_to_tensors,
    describe_parquet,
    export_parquet,
    prepare_parquet,
    read_parquet_arrays,
    to_parquet,
)
from weit_core.tables import load_parquet


def _rows(ds: ArrayDataset) -> set[bytes]:
    return {r.tobytes() for r in ds.x.numpy()}


# digits -----------------------------------------------------------------------------------------------------


def test_digits_splits_disjoint_deterministic_normalized():
    d = load_digits(seed=0)
    sizes = [len(d.train), len(d.val), len(d.test)]
    assert sum(sizes) == 1797 and sizes == [1257, 270, 270]
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    # the 1797 digits images are all distinct, so disjoint rows mean disjoint splits
    train, val, test = _rows(d.train), _rows(d.val), _rows(d.test)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 1797
    again, other = load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    assert not torch.equal(other.train.x, d.train.x)
    x = torch.cat([d.train.x, d.val.x, d.test.x])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert set(torch.cat([d.train.y, d.val.y, d.test.y]).tolist()) == set(range(10))
    assert d.describe() == {"name": "digits", "num_classes": 10, "input_shape": (1, 8, 8),
                            "n_train": 1257, "n_val": 270, "n_test": 270}


def test_subset_is_deterministic_and_capped():
    train = load_digits().train
    a, b, c = train.subset(100, seed=3), train.subset(100, seed=3), train.subset(100, seed=4)
    assert len(a) == 100 and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert _rows(a) <= _rows(train)
    assert len(train.subset(10**6)) == len(train)
    with pytest.raises(ValueError):
        train.subset(-1)


def test_array_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N×..."):
        ArrayDataset(torch.zeros(3), torch.zeros(3, dtype=torch.int64))  # no row shape
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(3, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(3, 1, 8, 8), torch.tensor(1))


def test_array_dataset_keeps_integer_targets_and_floats_the_rest():
    """Classes and discrete actions stay int64 whatever int type they come in; continuous targets float32."""
    ints = ArrayDataset(np.zeros((4, 8, 3)), np.arange(4, dtype=np.int32))
    floats = ArrayDataset(np.zeros((4, 8, 3)), np.ones((4, 2), dtype=np.float64))
    assert ints.x.dtype == floats.x.dtype == torch.float32 and ints.x.shape == (4, 8, 3)
    assert ints.y.dtype == torch.int64 and floats.y.dtype == torch.float32 and floats.y.shape == (4, 2)
    assert floats.subset(2, seed=1).y.shape == (2, 2)


# Fashion-MNIST ----------------------------------------------------------------------------------------------


def test_fashion_mnist_default_splits(fmnist_dir):
    d = load_fashion_mnist(fmnist_dir)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.train.x.dtype == torch.float32 and d.test.y.dtype == torch.int64
    official = torch.cat([d.train.y, d.val.y])
    assert torch.bincount(official, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(d.test.y, minlength=10).tolist() == [1000] * 10
    assert abs(d.train.x.mean().item()) < 0.02 and abs(d.train.x.std().item() - 1) < 0.02
    assert d.describe()["n_train"] == 55000


def test_fashion_mnist_limit_and_seed(fmnist_dir):
    a = load_fashion_mnist(fmnist_dir, limit=300, seed=0)
    b = load_fashion_mnist(fmnist_dir, limit=300, seed=0)
    c = load_fashion_mnist(fmnist_dir, limit=300, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (300, 300, 300)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert not _rows(a.train) & _rows(a.val)
    full = load_fashion_mnist(fmnist_dir, seed=0)
    assert torch.equal(full.train.x[:300], a.train.x) and torch.equal(full.val.y[:300], a.val.y)
    assert load_dataset("fashion-mnist", root=fmnist_dir, limit=10).name == "fashion_mnist"


def test_read_idx_reads_raw_and_gz(tmp_path, fmnist_dir):
    labels = read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((fmnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), labels)


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIT_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "default")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train-images-idx3-ubyte.gz").write_bytes(b"")  # 1 of 4 files is not enough
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path / "root")
    assert "WEIT_DATA" in str(err.value) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError):
        load_dataset("fashion_mnist")


def test_find_prefers_root_then_env(tmp_path, monkeypatch):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for stem in data.FASHION_MNIST_FILES.values():
            (tmp_path / folder / (stem if folder == "a" else stem + ".gz")).write_bytes(b"")
    monkeypatch.setenv("WEIT_DATA", str(tmp_path / "b"))
    assert find_fashion_mnist(tmp_path / "a") == tmp_path / "a"
    assert find_fashion_mnist() == tmp_path / "b"


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_round_trip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(good), arr)
    cases = {
        "bad_magic": gzip.compress(b"\x12\x34" + _idx_bytes(arr)[2:]),
        "truncated_payload": gzip.compress(_idx_bytes(arr)[:-5]),
        "truncated_gzip": gzip.compress(_idx_bytes(arr))[:-10],
        "not_gzip": b"definitely not gzip",
        "empty": b"",
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=str(path.name)):
            read_idx(path)
    raw = tmp_path / "raw-truncated"
    raw.write_bytes(_idx_bytes(arr)[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(raw)


# parquet ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def _digits_uint8(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_digits

    b = sk_digits()
    return (b.images[:n] * 255 / 16).round().astype(np.uint8), b.target[:n].astype(np.int64)


def test_to_parquet_round_trip_exact(tmp_path, digits):
    path = to_parquet(digits.train, tmp_path / "sub" / "train.parquet", split="train")
    back = read_parquet_arrays(path)
    assert torch.equal(back.x, digits.train.x) and torch.equal(back.y, digits.train.y)
    table = pq.read_table(path)
    assert isinstance(table.schema.field("image").type, pa.FixedShapeTensorType)
    assert list(table.schema.field("image").type.shape) == [1, 8, 8]
    assert table.schema.field("label").type == pa.int64()
    assert set(table.column("split").to_pylist()) == {"train"}
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1 and meta.num_rows == 1257


def test_export_parquet_writes_three_plain_files(tmp_path, digits):
    paths = export_parquet(digits, tmp_path / "out")
    assert paths == {s: tmp_path / "out" / f"{s}.parquet" for s in ("train", "val", "test")}
    for split, path in paths.items():
        assert pq.read_schema(path).names == ["image", "label"]  # no strings: iter_torch_batches-safe
        back = read_parquet_arrays(path)
        assert torch.equal(back.x, getattr(digits, split).x) and torch.equal(back.y, getattr(digits, split).y)
    back = load_dataset(str(tmp_path / "out"))  # a folder of parquet files, seeded re-split
    assert len(back.train) + len(back.val) + len(back.test) == 1797 and back.num_classes == 10


def _check_user_splits(d, n: int, val: int, test: int):
    assert (len(d.train), len(d.val), len(d.test)) == (n - val - test, val, test)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    x = d.train.x
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_load_parquet_tensor_list_png(tmp_path):
    imgs, labels = _digits_uint8(200)
    tensor = pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(imgs), "label": labels})
    nested = pa.table({"image": pa.array([im.tolist() for im in imgs]), "label": labels})
    pngs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    png = pa.table({"image": pa.array(pngs, type=pa.binary()), "label": labels})
    loaded = {}
    for name, table in {"tensor": tensor, "nested": nested, "png": png}.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=64)
        loaded[name] = load_parquet(path, seed=0)
        _check_user_splits(loaded[name], 200, 20, 20)
    assert torch.allclose(loaded["tensor"].train.x, loaded["png"].train.x)
    assert torch.allclose(loaded["tensor"].val.x, loaded["nested"].val.x, atol=1e-5)  # int64 lists, not /255
    assert torch.equal(loaded["tensor"].test.y, loaded["png"].test.y)
    other = load_parquet(tmp_path / "tensor.parquet", seed=1, val_fraction=0.25, test_fraction=0)
    _check_user_splits(other, 200, 50, 0)


def test_load_parquet_rgb_png_and_channel_last(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 6, 5, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    pngs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im, mode="RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pngs, "label": labels}), tmp_path / "rgb.parquet")
    hwc = pa.FixedShapeTensorArray.from_numpy_ndarray(imgs)
    pq.write_table(pa.table({"image": hwc, "label": labels}), tmp_path / "hwc.parquet")
    a, b = load_parquet(tmp_path / "rgb.parquet"), load_parquet(tmp_path / "hwc.parquet")
    assert a.input_shape == b.input_shape == (3, 6, 5) and a.num_classes == 3
    assert torch.allclose(a.train.x, b.train.x)
    per_channel = a.train.x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)


def test_load_parquet_split_column(tmp_path):
    imgs, labels = _digits_uint8(100)
    split = np.array(["train"] * 60 + ["val"] * 25 + ["test"] * 15)
    table = pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(imgs), "label": labels,
                      "split": split})
    pq.write_table(table, tmp_path / "s.parquet")
    d = load_parquet(tmp_path / "s.parquet")
    assert (len(d.train), len(d.val), len(d.test)) == (60, 25, 15)
    assert torch.equal(d.val.y, torch.from_numpy(labels[60:85]))
    assert abs(d.train.x.mean().item()) < 1e-4  # normalized by the train rows only
    # a directory of parquet files, one split missing -> carved from train
    folder = tmp_path / "dir"
    folder.mkdir()
    pq.write_table(table.slice(0, 60), folder / "part-0.parquet")
    pq.write_table(table.slice(85, 15), folder / "part-1.parquet")
    d = load_parquet(folder, val_fraction=0.1)
    assert (len(d.train), len(d.val), len(d.test)) == (54, 6, 15)
    assert torch.equal(d.test.y, torch.from_numpy(labels[85:]))
    bad = table.set_column(2, "split", pa.array(["train"] * 99 + ["holdout"]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="`split`.*holdout"):
        load_parquet(tmp_path / "bad.parquet")


def test_load_parquet_errors(tmp_path):
    imgs, labels = _digits_uint8(20)
    image = pa.FixedShapeTensorArray.from_numpy_ndarray(imgs)
    cases = {
        "no_label": (pa.table({"image": image, "y": labels}), "`label`"),
        "no_image": (pa.table({"pixels": image, "label": labels}), "`image`"),
        "float_label": (pa.table({"image": image, "label": labels.astype(np.float32)}), "`label`.*integer"),
        "str_label": (pa.table({"image": image, "label": labels.astype(str)}), "`label`"),
        "ragged": (pa.table({"image": pa.array([[1, 2, 3]] * 19 + [[1, 2]]), "label": labels}), "shapes"),
        "empty": (pa.table({"image": image, "label": labels}).slice(0, 0), "no rows"),
        "bad_png": (pa.table({"image": pa.array([b"xx"] * 20), "label": labels}), "`image`.*PNG"),
    }
    for name, (table, pattern) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path)
        with pytest.raises(ValueError, match=pattern):
            load_parquet(path)
    with pytest.raises(DataNotFoundError):
        load_parquet(tmp_path / "nope.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataNotFoundError, match="parquet"):
        load_parquet(tmp_path / "empty_dir")


def test_load_dataset_dispatch(tmp_path, digits):
    assert load_dataset("digits").describe() == digits.describe()
    with pytest.raises(ValueError, match="fashion_mnist, digits.*parquet"):
        load_dataset("cifar10")
    to_parquet(digits.val, tmp_path / "v.parquet")
    assert len(load_dataset(str(tmp_path / "v.parquet")).train) == 216


def test_reads_ray_tensor_metadata_without_ray(tmp_path):
    """What Ray Data's write_parquet produces (seen with Ray 2.60), read by a process without ray."""
    x = np.arange(10 * 9, dtype=np.float32).reshape(10, 1, 3, 3)
    field = pa.field("image", pa.large_list(pa.float32()), metadata={
        b"ARROW:extension:name": b"ray.data.arrow_tensor_v2", b"ARROW:extension:metadata": b"[1, 3, 3]"})
    table = pa.Table.from_arrays([pa.array(list(x.reshape(10, -1)), type=pa.large_list(pa.float32())),
                                  pa.array(np.arange(10))],
                                 schema=pa.schema([field, pa.field("label", pa.int64())]))
    pq.write_table(table, tmp_path / "ray.parquet")
    back = read_parquet_arrays(tmp_path / "ray.parquet")
    assert torch.equal(back.x, torch.from_numpy(x))


# Ray Data batches -------------------------------------------------------------------------------------------


def test_batch_to_tensors_forms(tmp_path, digits):
    """Ray Data (2.60) turns a fixed-shape tensor column into one (B, C, H, W) ndarray; pyarrow's
    to_numpy_ndarray gives the same. Ragged/pickled columns arrive as object arrays of per-row arrays."""
    path = to_parquet(digits.val, tmp_path / "val.parquet")
    table = pq.read_table(path).slice(0, 8)
    batch = {"image": table.column("image").combine_chunks().to_numpy_ndarray(),
             "label": table.column("label").to_numpy()}
    assert batch["image"].shape == (8, 1, 8, 8) and batch["image"].dtype == np.float32
    x, y = batch_to_tensors(batch)
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, digits.val.x[:8]) and torch.equal(y, digits.val.y[:8])
    objects = np.empty(8, dtype=object)
    objects[:] = list(batch["image"])
    x2, y2 = batch_to_tensors({"image": objects, "label": batch["label"].astype(np.int32)})
    assert torch.equal(x2, x) and y2.dtype == torch.int64
    x3, _ = batch_to_tensors({"image": batch["image"][:, 0], "label": batch["label"]})  # rows keep their shape
    assert x3.shape == (8, 8, 8)
    with pytest.raises(ValueError):
        batch_to_tensors({"image": np.zeros(8, np.float32), "label": batch["label"]})


def test_prepare_parquet_exports_once_and_reads_ready_folders(tmp_path, digits):
    """A job's data is exported once (a rerun with the same dataset, limit and seed reuses the files, other
    settings export again); a ready parquet folder is read in place, and --limit cannot shrink it."""
    first = prepare_parquet("digits", tmp_path / "job", limit=100, seed=0)
    assert (first.train_rows, first.num_classes, first.input_shape) == (100, 10, (1, 8, 8))
    assert first.info["val"] == first.info["test"] == 100
    stamp = (tmp_path / "job" / "train.parquet").stat().st_mtime_ns
    again = prepare_parquet("digits", tmp_path / "job", limit=100, seed=0)
    assert again.info == first.info and (tmp_path / "job" / "train.parquet").stat().st_mtime_ns == stamp
    smaller = prepare_parquet("digits", tmp_path / "job", limit=50, seed=0)
    assert smaller.train_rows == 50  # the seeded rows, not the first ones:
    assert torch.equal(read_parquet_arrays(smaller.paths["train"]).x, data.limit_splits(digits, 50, seed=0).train.x)

    export_parquet(digits, tmp_path / "ready")
    ready = prepare_parquet(str(tmp_path / "ready"), tmp_path / "unused")
    assert ready.train_rows == len(digits.train) and not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="--limit does not apply to the ready parquet folder"):
        prepare_parquet(str(tmp_path / "ready"), tmp_path / "unused", limit=10)


# any data: a policy's state contexts and actions ------------------------------------------------------------


def _policy_splits(continuous: bool) -> DatasetSplits:
    """Real rows reshaped as a policy's data: digits' 64 pixels as 8 states of 8 numbers, the digit's class
    as a discrete action, or its pixel row-means as a 2-D continuous action."""
    d = load_digits()

    def split(s: ArrayDataset) -> ArrayDataset:
        y = s.x.reshape(len(s), 8, 8).mean(-1)[:, :2] if continuous else s.y
        return ArrayDataset(s.x.reshape(len(s), 8, 8), y)

    io = {"obs_dim": 8, "act_dim": 2 if continuous else 10, "discrete": not continuous, "context": 8}
    return DatasetSplits("policy", split(d.train), split(d.val), split(d.test), 0 if continuous else 10, io=io)


@pytest.mark.parametrize("continuous", [False, True])
def test_non_image_data_round_trips_through_parquet_and_ray_batches(tmp_path, continuous):
    splits = _policy_splits(continuous)
    paths = export_parquet(splits, tmp_path / "policy")
    back = read_parquet_arrays(paths["train"])
    assert torch.equal(back.x, splits.train.x) and torch.equal(back.y, splits.train.y)
    assert back.y.dtype == (torch.float32 if continuous else torch.int64)
    table = pq.read_table(paths["train"])
    assert list(table.schema.field("image").type.shape) == [8, 8]
    assert isinstance(table.schema.field("label").type, pa.FixedShapeTensorType) == continuous
    # what Ray Data's numpy batches hold: one ndarray per fixed-shape tensor column
    cols = {c: table.column(c).combine_chunks() for c in ("image", "label")}
    batch = {c: (a.to_numpy_ndarray() if isinstance(a.type, pa.FixedShapeTensorType) else a.to_numpy())[:16]
             for c, a in cols.items()}
    x, y = batch_to_tensors(batch)
    assert torch.equal(x, splits.train.x[:16]) and torch.equal(y, splits.train.y[:16])
    prepared = describe_parquet(tmp_path / "policy", "policy")
    assert prepared.io == splits.io and prepared.input_shape == (8, 8) and prepared.train_rows == len(splits.train)
    again = prepare_parquet("unused", tmp_path / "job", load=lambda dataset, limit, seed: splits)
    assert again.io == splits.io and again.num_classes == splits.num_classes


def test_io_is_derived_for_images_and_required_otherwise(digits):
    assert digits.io == {"in_chans": 1, "img_size": 8, "num_classes": 10}
    assert data.limit_splits(digits, 10).io == digits.io
    with pytest.raises(ValueError, match="pass io="):
        DatasetSplits("states", *(ArrayDataset(torch.zeros(4, 8, 3), torch.zeros(4)) for _ in range(3)))


def test_image_parquet_keeps_its_exact_form(tmp_path, digits):
    """Image data is written as before the any-rank change: the same two columns, types and no io file."""
    export_parquet(digits, tmp_path / "img")
    schema = pq.read_schema(tmp_path / "img" / "train.parquet")
    assert schema.names == ["image", "label"] and schema.field("label").type == pa.int64()
    assert list(schema.field("image").type.shape) == [1, 8, 8] and not (tmp_path / "img" / "io.json").exists()
    assert describe_parquet(tmp_path / "img", "digits").io == digits.io
