"""Item shards: writer, manifest, reader (rank/worker split, shuffle, resume, bad samples), CLI, placeholders,
image decoding at model resolution."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from webdataset.tariterators import base_plus_ext

import megarec.data.shard_reader as shard_reader
from megarec.cli import main
from megarec.data.domain import DataError, Domain
from megarec.data.images import background_color, load_image, open_rgb, placeholder_bytes, placeholder_image
from megarec.data.shards import (ShardDataset, ShardLoader, collate_items, load_manifest, safe_key, unsafe_key,
                                 write_shards)
from megarec.data.tar_samples import iter_samples
from tests.dist import run_ranks

LONG_ID = "long." + "x" * 150  # > 100 characters: needs a PAX header in the tar


def make_domain(name: str, n_items: int, n_users: int = 12, seed: int = 0, text: bool = True,
                ids: list[str] | None = None, images: list[str | None] | None = None) -> Domain:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, n_items, size=int(rng.integers(3, 8))) for _ in range(n_users)]
    item_ids = ids or [f"{name.lower()}{i}" for i in range(n_items)]
    return Domain(name, item_ids, [f"u{u}" for u in range(n_users)], seqs,
                  item_text=[{"title": f"T{i} {name}", "brand": "é"} for i in range(n_items)] if text else None,
                  item_image=images)


def naive_positives(domain: Domain) -> list[list[str]]:
    """Neighbours right before/after each item in the training part (all but the last two) of each sequence."""
    nb: list[set[int]] = [set() for _ in range(domain.num_items)]
    for seq in domain.sequences:
        if len(seq) < 3:
            continue
        train = list(seq[:-2])
        for a, b in zip(train, train[1:]):
            if a != b:
                nb[a].add(b)
                nb[b].add(a)
    return [[f"{domain.name}/{domain.item_ids[j]}" for j in sorted(s)] for s in nb]


def keys_of(samples) -> list[str]:
    return [s["key"] for s in samples]


def read_slot(ds: ShardDataset, worker: int, monkeypatch) -> list[dict]:
    """Iterate ``ds`` in this process as DataLoader worker ``worker`` of ``ds.workers``."""
    info = SimpleNamespace(id=worker, num_workers=ds.workers)
    monkeypatch.setattr(shard_reader, "get_worker_info", lambda: info)
    try:
        return list(ds)
    finally:
        monkeypatch.setattr(shard_reader, "get_worker_info", lambda: None)


def read_rank_interleaved(ds: ShardDataset, monkeypatch) -> list:
    """What a DataLoader over ``ds`` yields: round-robin over the workers' streams."""
    streams = [read_slot(ds, w, monkeypatch) for w in range(ds.workers)]
    return [s[i] for i in range(max(map(len, streams))) for s in streams if i < len(s)]


@pytest.fixture(scope="module")
def shards_31(tmp_path_factory) -> Path:
    """31 items in shards of 7, 7, 7, 7, 3 (uneven), with 32 px placeholder images."""
    out = tmp_path_factory.mktemp("s31")
    write_shards(make_domain("A", 31), out, max_count=7, images="placeholder", placeholder_size=32)
    return out


# ----------------------------------------------------------------------------- keys and placeholders
@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_safe_key_round_trips_and_survives_webdataset_key_split(key):
    safe = safe_key(key)
    assert unsafe_key(safe) == key
    assert base_plus_ext(safe + ".json") == (safe, "json")
    assert not safe.startswith("_") and "." not in safe and "/" not in safe


def test_safe_key_examples():
    assert safe_key("Office/B00.5") == "Office%2FB00%2E5"
    assert safe_key("_x%") == "%5Fx%25"


def test_placeholder_is_deterministic_and_key_dependent():
    a, b = placeholder_image("A/1", 64), placeholder_image("A/1", 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert placeholder_image("A/2", 64).tobytes() != a.tobytes()
    assert a.getpixel((0, 0)) == background_color("A/1") == a.getpixel((63, 63))
    assert placeholder_bytes("A/1", 64) == placeholder_bytes("A/1", 64)
    png = Image.open(io.BytesIO(placeholder_bytes("A/1", 64, fmt="png")))
    assert png.format == "PNG" and png.convert("RGB").tobytes() == a.tobytes()
    with pytest.raises(ValueError, match="size"):
        placeholder_image("A/1", 8)
    with pytest.raises(ValueError, match="format"):
        placeholder_bytes("A/1", 64, fmt="gif")


def test_placeholder_texture_is_deterministic_and_photo_sized():
    flat, grain = placeholder_image("A/1", 64), placeholder_image("A/1", 64, texture=5)
    assert grain.tobytes() == placeholder_image("A/1", 64, texture=5).tobytes() != flat.tobytes()
    diff = np.abs(np.asarray(grain, dtype=int) - np.asarray(flat, dtype=int))
    assert diff.max() <= 5 and diff.mean() > 1
    assert len(placeholder_bytes("A/1", 128, texture=5)) > 1.5 * len(placeholder_bytes("A/1", 128))
    with pytest.raises(ValueError, match="texture"):
        placeholder_image("A/1", 64, texture=65)


def _naive(data: bytes, hw: tuple[int, int]) -> np.ndarray:
    """What public code does: full decode, PIL's (bicubic) resize to (width, height)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((hw[1], hw[0])), dtype=int)


def _hwc(t) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("hw, drafted", [((64, 48), (100, 100)), ((24, 24), (25, 25)), ((150, 120), (200, 200))])
def test_draft_decode_gives_exact_rgb_size_close_to_full_decode(hw, drafted):
    jpeg = placeholder_bytes("A/1", 200, texture=5)
    assert open_rgb(jpeg, hw).size == drafted  # decoded at 1/2, 1/8, 1/1 scale: the smallest covering hw
    assert open_rgb(jpeg, hw, draft=False).size == open_rgb(jpeg).size == (200, 200)
    for src in (jpeg, io.BytesIO(jpeg)):
        t = load_image(src, hw)
        assert t.dtype == torch.uint8 and tuple(t.shape) == (3, *hw) and t.is_contiguous()
    diff = np.abs(_hwc(load_image(jpeg, hw)) - _naive(jpeg, hw))
    assert diff.mean() < 4  # DCT-domain downscaling vs full decode + bicubic: ~1-3 grey levels on average
    exact = np.abs(_hwc(load_image(jpeg, hw, draft=False)) - _naive(jpeg, hw))
    assert exact.max() <= 2 and exact.mean() < 0.05  # torch's uint8 bicubic reproduces PIL's resize


def test_non_jpeg_images_decode_at_model_size(tmp_path):
    png = placeholder_bytes("A/1", 64, fmt="png")
    diff = np.abs(_hwc(load_image(png, (40, 30))) - _naive(png, (40, 30)))
    assert diff.max() <= 2 and diff.mean() < 0.05  # no draft for PNG: only the resize differs
    grey, rgba, tiny = (io.BytesIO() for _ in range(3))
    Image.new("L", (50, 20), 77).save(grey, format="JPEG")
    Image.new("RGBA", (30, 30), (10, 20, 30, 40)).save(rgba, format="PNG")
    Image.fromarray(np.full((5, 7, 3), 200, dtype=np.uint8)).save(tiny, format="PNG")
    grey_rgb = _hwc(load_image(grey.getvalue(), 16))
    assert grey_rgb.shape == (16, 16, 3) and np.abs(grey_rgb - 77).max() <= 1
    assert _hwc(load_image(rgba.getvalue(), 8))[0, 0].tolist() == [10, 20, 30]
    assert (_hwc(load_image(tiny.getvalue(), (16, 24))) == 200).all()  # upscaled
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert torch.equal(load_image(path, 24), load_image(png, 24))
    with pytest.raises(OSError, match="truncated"):
        load_image(placeholder_bytes("A/1", 200, texture=5)[:3000], 64)  # drafting still reads all the data
    for bad in (0, (3,), (4, -1), 2.5):
        with pytest.raises(ValueError, match="image size"):
            load_image(png, bad)


# ----------------------------------------------------------------------------- writer and manifest
def test_round_trip_every_field(tmp_path):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    ids = ["x.1", "a/b", "_u", "ü", LONG_ID, "plain"]
    images: list[str | None] = []
    for i in range(len(ids)):
        if i % 2 == 0:
            p = img_dir / f"{i}.png"
            Image.fromarray(np.full((5, 7, 3), 40 * i, dtype=np.uint8)).save(p)
            images.append(str(p))
        else:
            images.append(None)
    a = make_domain("A", len(ids), ids=ids, images=images)
    b = make_domain("B.2", 5, seed=1, text=False)
    paths = write_shards([a, b], tmp_path / "out", max_count=4, images="files")
    assert [p.name for p in paths] == ["items-000000.tar", "items-000001.tar", "items-000002.tar"]

    got = {s["key"]: s for s in ShardDataset(tmp_path / "out", shuffle=False, rank=0, world_size=1)}
    expected_pos = naive_positives(a) + naive_positives(b)
    assert len(got) == 11
    for g, (d, i) in enumerate([(a, i) for i in range(a.num_items)] + [(b, i) for i in range(b.num_items)]):
        s = got[f"{d.name}/{d.item_ids[i]}"]
        assert (s["domain"], s["item_id"]) == (d.name, d.item_ids[i])
        assert s["text"] == (d.item_text[i] if d.item_text else {})
        assert s["positives"] == expected_pos[g]
        if d.image(i) is None:
            assert s["image"] is None
        else:
            assert s["image"].tobytes() == Image.open(d.image(i)).convert("RGB").tobytes()
    assert sum(bool(s["positives"]) for s in got.values()) > 0


def test_multi_domain_shards_mix_the_domains_in_proportion(tmp_path):
    """Domains are interleaved by relative position, each in its own order: every shard holds each domain in
    proportion to its size (a pre-training run's first batches are not one domain), nothing lost or repeated."""
    from megarec.data.shard_writer import interleaved_order

    order = interleaved_order([30, 10, 5])
    assert sorted(order) == [(d, i) for d, n in enumerate([30, 10, 5]) for i in range(n)]
    for d in range(3):
        assert [i for dd, i in order if dd == d] == sorted(i for dd, i in order if dd == d)
    a, b = make_domain("A", 30), make_domain("B", 10, seed=1)
    write_shards([a, b], tmp_path / "out", max_count=8)
    per_shard = [Counter(unsafe_key(k).split("/")[0] for k, _ in iter_samples(p)) for p in sorted((tmp_path / "out").glob("*.tar"))]
    assert [c["A"] + c["B"] for c in per_shard] == [8, 8, 8, 8, 8]
    assert all(c["B"] == 2 for c in per_shard)             # 10 of 40 items: 2 of every 8


def test_placeholder_images_in_shards(shards_31):
    ds = ShardDataset(shards_31, shuffle=False, rank=0, world_size=1)
    for s in ds:
        ref = Image.open(io.BytesIO(placeholder_bytes(s["key"], 32))).convert("RGB")
        assert s["image"].size == (32, 32) and s["image"].tobytes() == ref.tobytes()
    assert all(s["image"] is None for s in ShardDataset(shards_31, rank=0, world_size=1, load_images=False))


def test_reader_decodes_at_model_size(shards_31):
    raw = {k: smp["jpg"] for s in load_manifest(shards_31)["shards"] for k, smp in iter_samples(s["path"])}
    ds = ShardDataset(shards_31, shuffle=False, rank=0, world_size=1, image_size=(16, 24), batch_size=8)
    batches = list(ds)
    assert [b["image"].shape for b in batches] == [(8, 3, 16, 24)] * 3 + [(7, 3, 16, 24)]
    assert batches[0]["image"].dtype == torch.uint8 and batches[0]["has_image"].all()
    for b in batches:
        for key, img in zip(b["key"], b["image"]):
            assert torch.equal(img, load_image(raw[safe_key(key)], (16, 24)))
    with pytest.raises(ValueError, match="image size"):
        ShardDataset(shards_31, rank=0, world_size=1, image_size=0)


def test_manifest_lists_shards_and_counts(shards_31, tmp_path):
    m = load_manifest(shards_31)
    assert m["num_items"] == 31 and m["images"] == "placeholder" and m["image_size"] is None
    assert [s["count"] for s in m["shards"]] == [7, 7, 7, 7, 3]
    assert m["domains"] == [{"name": "A", "items": 31, "has_text": True}]
    for s in m["shards"]:
        assert Path(s["path"]).stat().st_size == s["bytes"]
        assert sum(1 for _ in iter_samples(s["path"])) == s["count"]
    # size limit: every member is > 1 byte, so max_size=1 closes each shard after one item
    assert len(write_shards(make_domain("A", 4), tmp_path / "one", max_size=1)) == 4


def test_manifest_and_writer_errors(shards_31, tmp_path):
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(make_domain("A", 3), shards_31)
    with pytest.raises(DataError, match="no shard manifest"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="images must be one of"):
        write_shards(make_domain("A", 3), tmp_path / "x", images="jpeg")
    with pytest.raises(DataError, match="not files on disk"):
        write_shards(make_domain("A", 3, images=["http://x/1.jpg", None, None]), tmp_path / "x", images="files")
    with pytest.raises(DataError, match="positives has 2 entries for 3 items"):
        write_shards(make_domain("A", 3), tmp_path / "x", positives=[[], []])
    bad = tmp_path / "bad"
    write_shards(make_domain("A", 5), bad, max_count=2)
    man = json.loads((bad / "index.json").read_text())
    (bad / "index.json").write_text(json.dumps({**man, "num_items": 6}))
    with pytest.raises(DataError, match="num_items 6 but the shards hold 5"):
        load_manifest(bad)
    (bad / "index.json").write_text(json.dumps(man))
    (bad / "items-000001.tar").unlink()
    with pytest.raises(DataError, match="items-000001.tar is missing"):
        load_manifest(bad)
    (bad / "index.json").write_text("{broken")
    with pytest.raises(DataError, match="index.json: broken JSON"):
        load_manifest(bad)


# ----------------------------------------------------------------------------- images stored at the model's size
@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> tuple[Domain, dict[str, bytes]]:
    """6 items: grainy JPEGs of several sizes and aspects, a PNG, and one item without an image."""
    img_dir = tmp_path_factory.mktemp("orig")
    images, raw = [], {}
    for i, side in enumerate([200, 120, 90, 64, 150]):
        data = placeholder_bytes(f"A/a{i}", side, texture=5) if i != 3 else placeholder_bytes("A/a3", side, fmt="png")
        if i == 1:  # not square: 120 wide, 80 high
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).crop((0, 20, 120, 100)).save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
        p = img_dir / f"{i}.img"
        p.write_bytes(data)
        images.append(str(p))
        raw[f"A/a{i}"] = data
    return make_domain("A", 6, images=images + [None]), raw


class _CountingInterpolate:
    """Wraps torch's interpolate and counts its calls (a second resize at read time would call it)."""

    def __init__(self, monkeypatch):
        self.calls, self._orig = 0, torch.nn.functional.interpolate
        monkeypatch.setattr(torch.nn.functional, "interpolate", self)

    def __call__(self, *a, **kw):
        self.calls += 1
        return self._orig(*a, **kw)


def _stored(out: Path) -> dict[str, tuple[str, bytes, dict]]:
    """Per item key: (image member ext or None, its bytes, the metadata)."""
    got = {}
    for s in load_manifest(out)["shards"]:
        for key, smp in iter_samples(s["path"]):
            ext = next((e for e in ("jpg", "png", "webp") if e in smp), None)
            got[unsafe_key(key)] = (ext, smp.get(ext), json.loads(smp["json"]))
    return got


def test_images_stored_at_model_size(originals, tmp_path, monkeypatch):
    domain, raw = originals
    hw = (48, 64)
    write_shards(domain, tmp_path / "s", images="files", image_size=hw, max_count=4)
    m = load_manifest(tmp_path / "s")
    assert (m["image_size"], m["image_format"], m["image_quality"]) == ([48, 64], "JPEG", 95)
    stored = _stored(tmp_path / "s")
    for key, data in raw.items():
        ext, img, meta = stored[key]
        with Image.open(io.BytesIO(data)) as src, Image.open(io.BytesIO(img)) as im:
            assert ext == "jpg" and im.format == "JPEG" and im.size == (64, 48)  # exactly the model's size
            assert meta["image_original_size"] == [src.height, src.width]
    assert stored["A/a1"][2]["image_original_size"] == [80, 120]
    assert stored["A/a5"][:2] == (None, None) and "image_original_size" not in stored["A/a5"][2]

    # read at the stored size: decoded at full scale, no second resize, pixels as stored
    spy = _CountingInterpolate(monkeypatch)
    got = {s["key"]: s["image"] for s in ShardDataset(tmp_path / "s", rank=0, world_size=1, image_size=hw)}
    assert spy.calls == 0 and got["A/a5"] is None
    for key, data in raw.items():
        full = torch.from_numpy(np.array(Image.open(io.BytesIO(stored[key][1])).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(got[key], full)
        # close to resizing the original at read time: only the re-encoding (JPEG quality 95) differs
        # (~1.6 grey levels on these grainy 48 x 64 images; ~4-6 with 4:2:0 chroma subsampling)
        assert np.abs(_hwc(got[key]) - _hwc(load_image(data, hw))).mean() < 2.5
        assert np.abs(_hwc(got[key]) - _naive(data, hw)).mean() < 3
    list(ShardDataset(tmp_path / "s", rank=0, world_size=1, image_size=(24, 32)))
    assert spy.calls == 5  # the spy sees resizes: a smaller size is still resized


def test_lossless_stored_images_equal_the_read_time_resize(originals, tmp_path):
    domain, raw = originals
    write_shards(domain, tmp_path / "png", images="files", image_size=40, image_format="png")
    m = load_manifest(tmp_path / "png")
    assert (m["image_size"], m["image_format"], m["image_quality"]) == ([40, 40], "PNG", None)
    got = {s["key"]: s["image"] for s in ShardDataset(tmp_path / "png", rank=0, world_size=1, image_size=40)}
    for key, data in raw.items():  # the same resize as the reader's, stored losslessly: identical tensors
        assert torch.equal(got[key], load_image(data, 40))
    write_shards(domain, tmp_path / "webp", images="files", image_size=40, image_format="WEBP", image_quality=80)
    assert {v[0] for v in _stored(tmp_path / "webp").values()} == {"webp", None}


def test_reading_above_the_stored_size_warns_once(originals, tmp_path):
    domain, _ = originals
    write_shards(domain, tmp_path / "s", images="files", image_size=(32, 48))
    handler = _Lines()
    logging.getLogger("megarec.shards").addHandler(handler)
    try:
        ShardDataset(tmp_path / "s", rank=0, world_size=1, image_size=(32, 48))
        ShardDataset(tmp_path / "s", rank=0, world_size=1, image_size=16)
        ShardDataset(tmp_path / "s", rank=0, world_size=1)
        assert handler.lines == []
        ds = ShardDataset(tmp_path / "s", rank=0, world_size=1, image_size=(32, 64), batch_size=2)
        batches = list(ds) + list(ds)  # two epochs
    finally:
        logging.getLogger("megarec.shards").removeHandler(handler)
    assert ds.stored_image_size == (32, 48) and batches[0]["image"].shape[2:] == (32, 64)
    assert len(handler.lines) == 1 and "larger than the (32, 48) images these shards store" in handler.lines[0]


def test_build_time_resize_errors(originals, tmp_path):
    domain, _ = originals
    with pytest.raises(DataError, match="images='none' stores none"):
        write_shards(domain, tmp_path / "x", image_size=32)
    with pytest.raises(DataError, match="image format must be one of"):
        write_shards(domain, tmp_path / "x", images="files", image_size=32, image_format="gif")
    with pytest.raises(DataError, match=r"image quality must be in \[1, 100\]"):
        write_shards(domain, tmp_path / "x", images="files", image_size=32, image_quality=0)
    with pytest.raises(DataError, match="image size"):
        write_shards(domain, tmp_path / "x", images="files", image_size=(32, 0))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"A/a1: cannot resize image .*bad.jpg to \(8, 8\)"):
        write_shards(make_domain("A", 2, images=[None, str(bad)]), tmp_path / "x", images="files", image_size=8)
    write_shards(domain, tmp_path / "m", images="files", image_size=8)
    man = json.loads((tmp_path / "m" / "index.json").read_text())
    (tmp_path / "m" / "index.json").write_text(json.dumps({**man, "image_size": [8]}))
    with pytest.raises(DataError, match="'image_size' must be null or"):
        ShardDataset(tmp_path / "m", rank=0, world_size=1)


# ----------------------------------------------------------------------------- rank / worker split
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 2), (4, 3), (3, 8), (4, 16)])
def test_split_pad_and_drop_give_equal_counts(shards_31, monkeypatch, world, workers):
    slots = world * workers
    for uneven in ("pad", "drop") if slots <= 31 else ("pad",):  # more slots than items: only pad works
        per_rank = []
        for rank in range(world):
            ds = ShardDataset(shards_31, rank=rank, world_size=world, num_workers=workers, uneven=uneven,
                              seed=3, load_images=False, batch_size=2)
            batches = [b for w in range(workers) for b in read_slot(ds, w, monkeypatch)]
            assert len(batches) == len(ds)
            per_rank.append([k for b in batches for k in b["key"]])
        assert len({len(k) for k in per_rank}) == 1  # same samples (and batches) on every rank
        seen = Counter(k for keys in per_rank for k in keys)
        if uneven == "pad":
            assert set(seen) == {f"A/a{i}" for i in range(31)}
            assert sum(seen.values()) == -(-31 // slots) * slots
        else:
            assert max(seen.values()) == 1 and sum(seen.values()) == 31 // slots * slots


def test_two_ranks_two_dataloader_workers_see_each_item_once(tmp_path):
    out = tmp_path / "s"
    write_shards(make_domain("A", 36), out, max_count=5, images="placeholder", placeholder_size=16)  # 8 uneven
    seen = Counter()
    batches = []
    for rank in range(2):
        ds = ShardDataset(out, rank=rank, world_size=2, num_workers=2, batch_size=4, seed=1)
        got = list(DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda b: b))
        batches.append(len(got))
        for b in got:
            assert len(b["image"]) == len(b["key"]) and b["has_image"].all()
            seen.update(b["key"])
    assert batches == [len(ds)] * 2
    assert seen == Counter({f"A/a{i}": 1 for i in range(36)})


def test_num_workers_mismatch_is_an_error(shards_31):
    ds = ShardDataset(shards_31, rank=0, world_size=1, num_workers=1)
    with pytest.raises(ValueError, match="num_workers=1"):
        list(DataLoader(ds, batch_size=None, num_workers=2))
    with pytest.raises(DataError, match="cannot fill"):
        ShardDataset(shards_31, rank=0, world_size=8, num_workers=4, uneven="drop")
    with pytest.raises(ValueError, match="on_bad_sample"):
        ShardDataset(shards_31, on_bad_sample="ignore")


def _rank_keys(rank, world, path):
    ds = ShardDataset(path, batch_size=3, load_images=False)  # rank and world from torch.distributed
    return (ds.rank, ds.world_size, [k for b in ds for k in b["key"]])


def test_real_two_process_split(shards_31):
    results = run_ranks(_rank_keys, world_size=2, args=(str(shards_31),))
    assert [r[:2] for r in results] == [(0, 2), (1, 2)]
    assert len(results[0][2]) == len(results[1][2]) == 16
    seen = Counter(k for r in results for k in r[2])
    assert set(seen) == {f"A/a{i}" for i in range(31)} and sum(seen.values()) == 32


# ----------------------------------------------------------------------------- shuffle and resume
def test_shuffle_is_seeded_and_changes_with_epoch(shards_31):
    def order(seed, epoch, **kw):
        ds = ShardDataset(shards_31, rank=0, world_size=1, seed=seed, buffer_size=5, load_images=False, **kw)
        ds.set_epoch(epoch)
        return keys_of(ds)

    e0 = order(0, 0)
    assert e0 == order(0, 0)
    assert sorted(e0) == sorted(order(0, 1)) == sorted(f"A/a{i}" for i in range(31))
    assert e0 != order(0, 1) and e0 != order(1, 0)
    assert order(0, 0, shuffle=False) == [f"A/a{i}" for i in range(31)]
    # iterating in this process moves on to the next epoch
    ds = ShardDataset(shards_31, rank=0, world_size=1, buffer_size=5, load_images=False)
    assert keys_of(ds) == e0 and keys_of(ds) == order(0, 1) and ds.epoch == 2


@pytest.mark.parametrize("stop", [0, 5, 11, 16])
def test_resume_mid_epoch_in_process(shards_31, monkeypatch, stop):
    def make():
        return ShardDataset(shards_31, rank=1, world_size=2, num_workers=2, buffer_size=4, seed=7,
                            load_images=False)

    ds = make()
    ds.set_epoch(3)
    full = keys_of(read_rank_interleaved(ds, monkeypatch))
    resumed = make()
    resumed.load_state_dict({**resumed._fingerprint(), "epoch": 3, "consumed": stop})
    assert keys_of(read_rank_interleaved(resumed, monkeypatch)) == full[stop:]


def test_resume_from_state_dict_in_process(shards_31):
    def make():
        return ShardDataset(shards_31, rank=0, world_size=1, batch_size=4, buffer_size=6, load_images=False)

    ds = make()
    ds.set_epoch(2)
    full = [b["key"] for b in ds]
    ds = make()
    ds.set_epoch(2)
    it = iter(ds)
    head = [next(it)["key"] for _ in range(3)]
    state = ds.state_dict()
    assert (state["epoch"], state["consumed"]) == (2, 3)
    again = make()
    again.load_state_dict(state)
    assert head + [b["key"] for b in again] == full and again.epoch == 3
    with pytest.raises(RuntimeError, match="ShardLoader"):
        ShardDataset(shards_31, rank=0, world_size=1, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="cannot resume at 99"):
        make().load_state_dict({**state, "consumed": 99})


def test_loader_resume_with_worker_processes(shards_31):
    def make():
        return ShardLoader(ShardDataset(shards_31, rank=0, world_size=1, num_workers=2, batch_size=3,
                                        buffer_size=6, load_images=False))

    loader = make()
    epoch0 = [b["key"] for b in loader]
    epoch1 = [b["key"] for b in loader]
    assert len(epoch0) == len(loader) == 12 and epoch0 != epoch1

    first = make()
    it = iter(first)
    head = [next(it)["key"] for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 5
    again = make()
    again.load_state_dict(state)
    assert head + [b["key"] for b in again] == epoch0
    assert [b["key"] for b in again] == epoch1  # and the next epoch continues as uninterrupted
    with pytest.raises(ValueError, match="batch_size"):
        make().load_state_dict({**state, "batch_size": 4})


# ----------------------------------------------------------------------------- bad samples
@pytest.fixture()
def bad_shards(tmp_path) -> Path:
    """12 items in shards of 4; item a5's image file is garbage; a9's JSON and a2..a3's tar header get corrupted."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images = []
    for i in range(12):
        p = img_dir / f"{i}.jpg"
        p.write_bytes(b"this is not an image" if i == 5 else placeholder_bytes(f"A/a{i}", 16))
        images.append(str(p))
    out = tmp_path / "bad"
    write_shards(make_domain("A", 12, images=images), out, max_count=4, images="files")
    # a9: break its JSON (same length, data only: the tar stays valid)
    shard = out / "items-000002.tar"
    raw = bytearray(shard.read_bytes())
    at = raw.index(b'{"key": "A/a9"')
    raw[at] = ord("x")
    shard.write_bytes(bytes(raw))
    # a2: corrupt the header of its first member; the rest of shard 0 (a2, a3) becomes unreadable
    shard = out / "items-000000.tar"
    with tarfile.open(shard) as tf:
        offset = next(m.offset for m in tf.getmembers() if m.name.startswith("A%2Fa2."))
    raw = bytearray(shard.read_bytes())
    raw[offset + 10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return out


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_bad_samples_are_skipped_counted_and_logged(bad_shards):
    handler = _Lines()
    logging.getLogger("megarec.shards").addHandler(handler)
    try:
        ds = ShardDataset(bad_shards, rank=0, world_size=1, shuffle=False)
        keys = keys_of(ds)
    finally:
        logging.getLogger("megarec.shards").removeHandler(handler)
    assert ds.bad_samples == 4
    assert len(keys) == 12  # substitutes keep the count (and every rank's batch count) unchanged
    assert not {"A/a2", "A/a3", "A/a5", "A/a9"} & set(keys)
    assert keys[:4] == ["A/a0", "A/a1", "A/a1", "A/a1"] and keys[5] == "A/a4" and keys[9] == "A/a8"
    log = "\n".join(handler.lines)
    assert "checksum mismatch" in log and "undecodable .jpg image" in log and "broken JSON" in log
    assert "4 bad samples skipped" in log or "4 in total" in log


def test_bad_images_are_caught_when_decoding_at_model_size(bad_shards, tmp_path):
    ds = ShardDataset(bad_shards, rank=0, world_size=1, shuffle=False, image_size=8)
    keys = keys_of(ds)
    assert ds.bad_samples == 4 and len(keys) == 12 and "A/a5" not in keys
    img_dir = tmp_path / "img_t"
    img_dir.mkdir()
    paths = []
    for i in range(3):
        data = placeholder_bytes(f"A/a{i}", 64, texture=5)
        (img_dir / f"{i}.jpg").write_bytes(data[:len(data) // 2] if i == 1 else data)  # a1: truncated JPEG
        paths.append(str(img_dir / f"{i}.jpg"))
    write_shards(make_domain("A", 3, images=paths), tmp_path / "t", images="files")
    with pytest.raises(DataError, match=r"'A%2Fa1'.*undecodable .jpg image.*truncated"):
        list(ShardDataset(tmp_path / "t", rank=0, world_size=1, shuffle=False, image_size=16, on_bad_sample="fail"))


def test_bad_samples_fail_when_asked(bad_shards):
    with pytest.raises(DataError, match="corrupt tar header"):
        list(ShardDataset(bad_shards, rank=0, world_size=1, shuffle=False, on_bad_sample="fail"))
    ds = ShardDataset(bad_shards, rank=1, world_size=2, shuffle=False, on_bad_sample="fail")  # a6..a11
    with pytest.raises(DataError, match=r"'A%2Fa9'.*broken JSON"):
        list(ds)


def test_truncated_shard_counts_lost_samples(tmp_path):
    out = tmp_path / "t"
    write_shards(make_domain("A", 6), out, max_count=6)
    shard = out / "items-000000.tar"
    shard.write_bytes(shard.read_bytes()[:2600])  # a0, a1 complete (header + one data block each), a2 cut
    ds = ShardDataset(out, rank=0, world_size=1, shuffle=False)
    keys = keys_of(ds)
    assert len(keys) == 6 and ds.bad_samples == 6 - len(set(keys)) > 0
    assert keys[0] == "A/a0"


def test_loader_sums_bad_samples_over_workers(bad_shards):
    loader = ShardLoader(ShardDataset(bad_shards, rank=0, world_size=1, num_workers=2, batch_size=2))
    assert sum(len(b["key"]) for b in loader) == 12
    assert loader.bad_samples == 4


def test_collate_stacks_tensor_images():
    import torch
    batch = collate_items([
        {"key": "A/1", "domain": "A", "item_id": "1", "text": {}, "positives": [], "image": torch.ones(3, 2, 2)},
        {"key": "A/2", "domain": "A", "item_id": "2", "text": {}, "positives": ["A/1"], "image": None},
    ])
    assert batch["image"].shape == (2, 3, 2, 2) and batch["image"][1].sum() == 0
    assert batch["has_image"].tolist() == [True, False] and batch["positives"] == [[], ["A/1"]]


# ----------------------------------------------------------------------------- CLI
def test_cli_build_shards(tmp_path, capsys):
    d = tmp_path / "Toys"
    d.mkdir()
    (d / "Toys.inter.json").write_text(json.dumps({f"u{u}": [u % 4, (u + 1) % 4, (u + 2) % 4, 4] for u in range(6)}))
    (d / "Toys.item.json").write_text(json.dumps({str(i): {"title": f"toy {i}"} for i in range(5)}))
    out = tmp_path / "shards"
    args = ["build-shards", str(d), "--out", str(out), "--max-count", "2", "--images", "placeholder",
            "--placeholder-size", "24"]
    assert main(args) == 0
    assert "5 items in 3 shards" in capsys.readouterr().out
    got = {s["key"]: s for s in ShardDataset(out, rank=0, world_size=1)}
    assert got["Toys/1"]["text"] == {"title": "toy 1"} and got["Toys/4"]["image"].size == (24, 24)
    assert got["Toys/1"]["positives"] == ["Toys/0", "Toys/2"]
    assert main(args) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--overwrite", "--image-size", "16"]) == 0
    assert "(images stored at 16x16)" in capsys.readouterr().out
    assert load_manifest(out)["image_size"] == [16, 16]
    raw = _stored(out)
    assert all(Image.open(io.BytesIO(v[1])).size == (16, 16) and v[2]["image_original_size"] == [24, 24]
               for v in raw.values())
    got = {s["key"]: s for s in ShardDataset(out, rank=0, world_size=1, image_size=16)}
    assert got["Toys/4"]["image"].shape == (3, 16, 16)
    assert main(args + ["--overwrite", "--image-size", "16", "--image-quality", "0"]) == 2
    assert "image quality must be in [1, 100]" in capsys.readouterr().err
