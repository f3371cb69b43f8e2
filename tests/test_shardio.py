"""The numpy shard encoder (:mod:`ddps_core.features.shardio`) against zarr itself: the files
it writes are byte-identical to zarr's for the same data and metadata, zarr reads them back
bit-exactly, and metadata it cannot reproduce exactly is refused (the store then uses zarr)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from ddps_core.features import FeatureStore, shard_ranges
from ddps_core.features import store as store_module
from ddps_core.features.shardio import (
    ShardLayout,
    UnsupportedLayout,
    _crc32c,
    fsync_dirs,
    write_files_atomic,
)


def _pair(tmp_path: Path, shape, k, dtype, fill, index_location="end", index_crc=True):
    """Two empty arrays with identical metadata: one for zarr's writes, one for ours."""
    chunk = (1, *shape[1:])
    shard = (k, *shape[1:])
    index_codecs = [BytesCodec(), *([Crc32cCodec()] if index_crc else [])]
    arrays = []
    for name in ("by_zarr", "by_numpy"):
        if index_location == "end" and index_crc:  # the store's way of creating arrays
            arr = zarr.create_array(str(tmp_path / name), shape=shape, chunks=chunk, shards=shard,
                                    dtype=dtype, fill_value=fill, compressors=None, zarr_format=3)
        else:
            arr = zarr.create_array(
                str(tmp_path / name), shape=shape, chunks=shard, dtype=dtype, fill_value=fill,
                serializer=ShardingCodec(chunk_shape=chunk, codecs=[BytesCodec()],
                                         index_codecs=index_codecs, index_location=index_location),
                compressors=None, zarr_format=3,
            )
        arrays.append(arr)
    meta = [json.loads((tmp_path / name / "zarr.json").read_text()) for name in ("by_zarr", "by_numpy")]
    assert meta[0] == meta[1]
    return arrays[0], arrays[1], ShardLayout.from_metadata(meta[1])


def _shard_file(arr, root: Path, k: int) -> Path:
    return root / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def _source(shape, dtype, fill, seed):
    """Random values, with one image entirely the fill value (zarr leaves such chunks out),
    one image that only starts with it, and, for float types, scattered NaNs."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        data = rng.standard_normal(shape).astype(dtype)
        data.reshape(shape[0], -1)[1, ::3] = np.nan
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    data[2] = fill
    data.reshape(shape[0], -1)[3, 0] = fill
    return data


CASES = [
    # shape (N, ...), images per shard, dtype, fill value
    pytest.param((7, 5, 3, 9), 3, "float16", float("nan"), id="fp16-nan-odd-nonsquare-partial-last"),
    pytest.param((8, 4, 6, 6), 4, "float16", float("nan"), id="fp16-nan-whole-shards"),
    pytest.param((5, 1, 2, 3), 2, "float16", 0.0, id="fp16-zero-fill"),
    pytest.param((6, 3, 5), 4, "float32", -1.5, id="fp32-3d"),
    pytest.param((9, 7, 7), 4, "uint8", 255, id="uint8-labels-like"),
    pytest.param((5, 11), 5, "int16", 0, id="int16-2d"),
]


@pytest.mark.parametrize("shape,k,dtype,fill", CASES)
def test_encoder_writes_zarrs_bytes_and_reads_back_exactly(tmp_path, shape, k, dtype, fill):
    by_zarr, by_numpy, layout = _pair(tmp_path, shape, k, dtype, fill)
    data = _source(shape, dtype, fill, seed=len(shape) * 100 + k)
    n_shards = -(-shape[0] // k)
    for s in range(n_shards):
        a, b = s * k, min(shape[0], (s + 1) * k)
        by_zarr[a:b] = data[a:b]
        pieces = layout.encode(s, data[a:b])
        assert pieces is not None
        write_files_atomic([(_shard_file(by_numpy, tmp_path / "by_numpy", s), pieces)])
        ours = _shard_file(by_numpy, tmp_path / "by_numpy", s).read_bytes()
        theirs = _shard_file(by_zarr, tmp_path / "by_zarr", s).read_bytes()
        assert len(ours) == len(theirs) and ours == theirs, f"shard {s} differs from zarr's file"
    assert sorted(p.name for p in (tmp_path / "by_numpy").rglob("*")) == \
        sorted(p.name for p in (tmp_path / "by_zarr").rglob("*"))  # no stray temp files
    back = zarr.open_array(str(tmp_path / "by_numpy"), mode="r")[...]
    expect = data.copy()
    if np.dtype(dtype).kind == "f" and np.isnan(fill):  # an omitted all-fill image reads as the fill
        expect[2] = fill
    bits = f"u{np.dtype(dtype).itemsize}"
    np.testing.assert_array_equal(back.view(bits), expect.view(bits))


@pytest.mark.parametrize("location", ["start", "end"])
@pytest.mark.parametrize("crc", [True, False])
def test_index_location_and_codecs(tmp_path, location, crc):
    shape, k = (5, 3, 4, 2), 2
    by_zarr, by_numpy, layout = _pair(tmp_path, shape, k, "float16", float("nan"), location, crc)
    assert layout.index_at_start == (location == "start") and layout.index_crc32c == crc
    data = _source(shape, "float16", float("nan"), seed=7)
    by_zarr[...] = data
    for s in range(3):
        a, b = s * k, min(shape[0], (s + 1) * k)
        write_files_atomic([(_shard_file(by_numpy, tmp_path / "by_numpy", s), layout.encode(s, data[a:b]))])
        assert _shard_file(by_numpy, tmp_path / "by_numpy", s).read_bytes() == \
            _shard_file(by_zarr, tmp_path / "by_zarr", s).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "by_numpy"))[...].view("u2"),
                                  zarr.open_array(str(tmp_path / "by_zarr"))[...].view("u2"))


def test_all_fill_shard_is_no_file_and_crc32c_vector(tmp_path):
    layout = _pair(tmp_path, (4, 2, 3, 3), 2, "float16", float("nan"))[2]
    assert layout.encode(1, np.full((2, 2, 3, 3), np.nan, dtype=np.float16)) is None  # zarr deletes it
    with pytest.raises(ValueError, match="shape"):
        layout.encode(0, np.zeros((1, 2, 3, 3)))
    with pytest.raises(IndexError):
        layout.encode(2, np.zeros((2, 2, 3, 3)))
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value


def test_encode_makes_no_copy_of_a_float16_buffer(tmp_path):
    layout = _pair(tmp_path, (4, 2, 3, 3), 4, "float16", float("nan"))[2]
    data = np.ones((4, 2, 3, 3), dtype=np.float16)
    pieces = layout.encode(0, data)
    assert len(pieces) == 2 and np.shares_memory(np.asarray(pieces[0]), data)


def test_write_files_atomic_keeps_old_content_on_failure(tmp_path):
    targets = [tmp_path / "a" / "c" / str(i) / "0" for i in range(3)]
    with ThreadPoolExecutor(2) as pool:
        write_files_atomic([(t, [b"old", str(i).encode()]) for i, t in enumerate(targets)], pool)
    fsync_dirs([*targets, tmp_path / "a" / "c" / "missing" / "0"], tmp_path / "a")
    assert [t.read_bytes() for t in targets] == [b"old0", b"old1", b"old2"]

    def failing():
        yield b"new"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_files_atomic([(targets[0], [b"new0"]), (targets[1], failing()), (targets[2], [b"new2"])])
    assert [t.read_bytes() for t in targets] == [b"old0", b"old1", b"old2"]  # none replaced
    assert sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file()) == ["0", "0", "0"]


def _meta(tmp_path: Path, **kwargs) -> dict:
    zarr.create_array(str(tmp_path / "m"), zarr_format=3, **kwargs)
    return json.loads((tmp_path / "m" / "zarr.json").read_text())


@pytest.mark.parametrize("kwargs,reason", [
    (dict(shape=(4, 2, 3), chunks=(1, 2, 3), shards=(2, 2, 3), dtype="float16", compressors=[zarr.codecs.ZstdCodec()]),
     "compressed"),
    (dict(shape=(4, 2, 3), chunks=(1, 1, 3), shards=(2, 2, 3), dtype="float16", compressors=None), "whole images"),
    (dict(shape=(4, 2, 6), chunks=(1, 2, 3), shards=(2, 2, 6), dtype="float16", compressors=None), "whole images"),
    (dict(shape=(4, 2, 3), chunks=(1, 2, 3), dtype="float16", compressors=None), "sharding_indexed"),
    (dict(shape=(4, 2, 3), chunks=(1, 2, 3), shards=(2, 2, 3), dtype="float16", compressors=None,
          serializer=BytesCodec(endian="big")), "little-endian"),
    (dict(shape=(4, 2, 3), chunks=(1, 2, 3), shards=(2, 2, 3), dtype="bool", compressors=None), "data_type"),
])
def test_unsupported_metadata_is_refused(tmp_path, kwargs, reason):
    with pytest.raises(UnsupportedLayout, match=reason):
        ShardLayout.from_metadata(_meta(tmp_path, **kwargs))


def test_unsupported_metadata_by_hand(tmp_path):
    base = _meta(tmp_path, shape=(4, 2, 3), chunks=(1, 2, 3), shards=(2, 2, 3), dtype="float16",
                 fill_value=float("nan"), compressors=None)
    ShardLayout.from_metadata(base)  # supported as made
    config = base["codecs"][0]["configuration"]
    edits = {
        "big-endian inner": ("codecs", [{"name": "bytes", "configuration": {"endian": "big"}}], "little-endian"),
        "transpose": ("codecs", [{"name": "transpose", "configuration": {"order": [0, 2, 1]}},
                                 {"name": "bytes", "configuration": {"endian": "little"}}], "not just 'bytes'"),
        "index checksum": ("index_codecs", [{"name": "bytes", "configuration": {"endian": "little"}},
                                            {"name": "adler32"}], "crc32c"),
        "index location": ("index_location", "middle", "index_location"),
    }
    for what, (key, value, reason) in edits.items():
        meta = json.loads(json.dumps(base))
        meta["codecs"][0]["configuration"][key] = value
        with pytest.raises(UnsupportedLayout, match=reason):
            ShardLayout.from_metadata(meta)
    assert config == base["codecs"][0]["configuration"]
    for key, value, reason in [("storage_transformers", [{"name": "x"}], "storage"),
                               ("must_understand_ext", {}, "unknown metadata"),
                               ("fill_value", "fish", "fill_value"),
                               ("chunk_grid", {"name": "regular"}, "malformed")]:
        meta = dict(base, **{key: value})
        with pytest.raises(UnsupportedLayout, match=reason):
            ShardLayout.from_metadata(meta)


@pytest.mark.parametrize("keys", ["flat", "nested"])
def test_store_writes_its_own_shard_files_unless_compressed(tmp_path, monkeypatch, keys):
    """The store's shard files equal zarr's for the same data: fast path for the float16
    features and the uint8 labels, zarr for every array of a compressed store; with the
    flat chunk keys of new stores and the nested ones of stores made before them."""
    if keys == "nested":
        monkeypatch.setattr(store_module, "FLAT_KEYS", {"name": "default", "separator": "/"})
    shapes = {"t5_b0": (3, 7, 5), "t5_b1": (1, 4, 4)}
    S, n = 8, 7
    rng = np.random.default_rng(0)
    feats = {name: rng.standard_normal((n, *shp)).astype(np.float16) for name, shp in shapes.items()}
    labels = rng.integers(0, 3, (n, S, S)).astype(np.uint8)
    stores = {}
    for compress in (False, True):
        stores[compress] = store = FeatureStore.create(
            tmp_path / f"s{compress}", model_id="m", steps=[5], blocks=[0, 1], image_size=S,
            image_ids=[str(i) for i in range(n)], shapes=shapes, shard_images=3, num_classes=3,
            ignore_index=255, compress=compress)
        for k, a, b in shard_ranges(store):
            store.write_shard(k, {name: v[a:b] for name, v in feats.items()}, labels[a:b])
        assert store.is_complete()
        reopened = FeatureStore.open(store.path, read_only=True)
        for i in range(n):
            np.testing.assert_array_equal(reopened.label(i), labels[i])
            for name in shapes:
                np.testing.assert_array_equal(np.asarray(reopened._arrays[name][i]).view("u2"),
                                              feats[name][i].view("u2"))
        assert not list(store.path.rglob("*.partial"))
    assert sorted(stores[False]._layouts) == sorted([*shapes, "labels"]) and not stores[False].zarr_written
    if keys == "flat":  # shard files sit in the array's folder: no folders per shard
        assert sorted(os.listdir(stores[False].path / "t5_b0")) == ["c.0.0.0.0", "c.1.0.0.0", "c.2.0.0.0", "zarr.json"]
    assert sorted(stores[True].zarr_written) == sorted([*shapes, "labels"]) and not stores[True]._layouts
    # reference: zarr's own whole-shard writes into an array with the same metadata
    for name in shapes:
        ref = zarr.create_array(str(tmp_path / f"ref_{name}"), shape=(n, *shapes[name]), chunks=(1, *shapes[name]),
                                shards=(3, *shapes[name]), dtype="float16", fill_value=float("nan"),
                                compressors=None, dimension_names=("image", "channel", "y", "x"), zarr_format=3,
                                chunk_key_encoding=store_module.FLAT_KEYS)
        assert json.loads((tmp_path / f"ref_{name}" / "zarr.json").read_text()) == \
            json.loads((stores[False].path / name / "zarr.json").read_text())
        for k, a, b in shard_ranges(stores[False]):
            ref[a:b] = feats[name][a:b]
            assert stores[False]._chunk_file(name, (k, 0, 0, 0)).read_bytes() == \
                _shard_file(ref, tmp_path / f"ref_{name}", k).read_bytes()
    ref = zarr.create_array(str(tmp_path / "ref_labels"), shape=(n, S, S), chunks=(1, S, S), shards=(3, S, S),
                            dtype="uint8", fill_value=255, compressors=None, dimension_names=("image", "y", "x"),
                            zarr_format=3, chunk_key_encoding=store_module.FLAT_KEYS)
    assert json.loads((tmp_path / "ref_labels" / "zarr.json").read_text()) == \
        json.loads((stores[False].path / "labels" / "zarr.json").read_text())
    for k, a, b in shard_ranges(stores[False]):
        ref[a:b] = labels[a:b]
        assert stores[False]._chunk_file("labels", (k, 0, 0)).read_bytes() == \
            _shard_file(ref, tmp_path / "ref_labels", k).read_bytes()


@pytest.mark.parametrize("compress,num_classes", [(False, 3), (True, 300), (False, None)])
def test_store_metadata_documents_equal_zarrs_own_on_disk(tmp_path, compress, num_classes):
    """A store's metadata (built in memory, then written as files) is byte for byte what
    zarr writes when the same group and arrays are created on a local folder."""
    shapes = {"t5_b0": (3, 7, 5), "t5_b2": (1, 4, 4), "t9_b0": (3, 7, 5), "t9_b2": (1, 4, 4)}
    ids, S, k = [f"im{i}" for i in range(5)], 8, 2
    store = FeatureStore.create(tmp_path / "ours.zarr", model_id="m", steps=[5, 9], blocks=[0, 2],
                                image_size=S, image_ids=ids, shapes=shapes, shard_images=k,
                                num_classes=num_classes, ignore_index=255, compress=compress)
    ref_path = tmp_path / "ref.zarr"
    group = zarr.create_group(str(ref_path), attributes=dict(store.attrs), zarr_format=3)
    compressors = [zarr.codecs.ZstdCodec(level=1)] if compress else None
    for name, (c, h, w) in shapes.items():
        group.create_array(name, shape=(5, c, h, w), chunks=(1, c, h, w), shards=(k, c, h, w),
                           dtype="float16", fill_value=float("nan"), compressors=compressors,
                           dimension_names=("image", "channel", "y", "x"),
                           chunk_key_encoding={"name": "default", "separator": "."})
    if num_classes is not None:
        group.create_array("labels", shape=(5, S, S), chunks=(1, S, S), shards=(k, S, S),
                           dtype="uint8" if num_classes <= 255 else "uint16", fill_value=255,
                           compressors=compressors, dimension_names=("image", "y", "x"),
                           chunk_key_encoding={"name": "default", "separator": "."})
    group.create_array("done", shape=(5,), chunks=(k,), dtype="uint8", fill_value=0,
                       compressors=None, dimension_names=("image",))

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    ours, ref = files(store.path), files(ref_path)
    assert sorted(ours) == sorted(ref)
    assert len(ours) == len(shapes) + 2 + (num_classes is not None)
    for rel in ref:
        assert ours[rel] == ref[rel], rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
