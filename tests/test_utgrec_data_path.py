"""UTGRec's data path (megarec/methods/utgrec/data_path.py): batches prepared in DataLoader workers equal those
prepared in this process, positives per (seed, batch index, rank), the latent cache (distributed write, equal to
on-the-fly latents, another VAE / size = clear error before compute), shards without images, the encoder's image
size, the VAE target at its own size, resume with workers, and the items/s measurement."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.utgrec_fixtures import tiny_models, tiny_overrides, write_sample_domains, write_sample_shards


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("utgrec_data")
    qwen, vae = tiny_models(root)
    return {"root": root, "shards": write_sample_shards(root), "qwen": qwen, "vae": vae}


def _cfg(env, run_dir: Path | None = None, extra=(), vae=True):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    o = tiny_overrides(env["qwen"], env["vae"] if vae else None)
    o += [("data.shards", str(env["shards"])), ("train.batch_size", "4"), ("train.max_steps", "4"),
          ("utgrec.loss.warmup_steps", "1"), ("train.run_dir", str(run_dir or env["root"] / "unused")),
          ("train.log_every", "2"), ("train.eval_every", "1000"), ("train.save_every_steps", "2"),
          ("data.heldout_items", "0"), ("train.progress", "false"), ("train.lr", "3e-3"),
          ("export.codes", "false")]
    return load_config(TrainTokenizerConfig, None, o + list(extra))


def _preparer(env, image_size=28):
    from megarec.methods.utgrec.item_inputs import ItemPreparer

    return ItemPreparer.from_pretrained("qwen2vl", str(env["qwen"]), 3, 16, image_size)


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def _without_worker(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "worker"}


def test_workers_prepare_exactly_the_batches_of_the_main_process(env, monkeypatch):
    """Two worker processes vs. the same epoch plan read in this process (each worker's stream in turn, the
    DataLoader's round-robin): identical encoder inputs, text targets, positives, latents, has-image."""
    from types import SimpleNamespace

    from megarec.data import shard_reader
    from megarec.methods.utgrec.data_path import TrainBatchMaker, train_loader
    from megarec.methods.utgrec.item_lookup import ItemLookup

    cfg = _cfg(env, extra=[("data.num_workers", "2"), ("data.prefetch_factor", "2")], vae=False)
    lookup = ItemLookup(env["shards"])
    maker = TrainBatchMaker.for_config(cfg, _preparer(env), lookup, None, rank=0)
    ds, loader = train_loader(cfg, maker, rank=0, world_size=1)
    got = list(loader)
    assert len(got) == len(ds) == 12 and all(b["prepared"] for b in got)
    assert {b["worker"] for b in got} == {0, 1}

    streams = []
    for w in range(2):
        info = SimpleNamespace(id=w, num_workers=2)
        monkeypatch.setattr(shard_reader, "get_worker_info", lambda: info)
        streams.append(list(ds))
    monkeypatch.setattr(shard_reader, "get_worker_info", lambda: None)
    want = [s[i] for i in range(6) for s in streams]
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_same(_without_worker(a), _without_worker(b), f"batch {i}")
    # the positives of batch i are drawn with (seed, i, rank) whichever process prepares it
    for i, b in enumerate(got):
        pos = maker.positives(b["key"], 0, i)
        texts = [lookup.text(lookup.position(k)) for k in b["key"]] + [lookup.text(p) for p in pos]
        ids, _ = maker.preparer.text_targets(texts, cfg.utgrec.decoder.max_text_tokens)
        assert torch.equal(ids, b["ids"])
    assert got[0]["enc"]["pixel_values"].shape[0] > 0 and got[0]["enc"]["image_grid_thw"].shape[0] == 8


def test_positives_are_read_in_one_pass_per_shard(env, monkeypatch):
    import builtins

    from megarec.methods.utgrec.item_lookup import ItemLookup

    lookup = ItemLookup(env["shards"])
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    positions = list(range(len(lookup)))[::-1]
    data = lookup.image_bytes(positions)
    monkeypatch.setattr(builtins, "open", real_open)
    assert len(opened) == len(set(opened)) == len(lookup.manifest["shards"])
    assert data[3] == lookup.image_bytes([positions[3]])[0] and all(d is not None for d in data)


def test_latent_cache_written_by_two_ranks_equals_one_rank_and_on_the_fly_latents(env):
    from megarec.methods.utgrec.data_path import TrainBatchMaker
    from megarec.methods.utgrec.image_decoder import ImageLatents
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.latent_cache import LatentCache, write_latent_cache
    from megarec.data.shard_reader import ShardDataset

    lookup = ItemLookup(env["shards"])
    vae = ImageLatents(str(env["vae"]), 16, 2)
    one = write_latent_cache(env["shards"], str(env["vae"]), env["root"] / "one.safetensors", 16, 2, vae=vae,
                             lookup=lookup, progress=False)
    two = env["root"] / "two.safetensors"
    # two jobs encode the same cache at once (rank 1 of each, then each rank 0 joins): neither touches
    # the other's part files
    kw = dict(vae=vae, lookup=lookup, progress=False, world_size=2, batch_size=5)
    for token, rank in (("jobA", 1), ("jobB", 1), ("jobB", 0), ("jobA", 0)):
        write_latent_cache(env["shards"], str(env["vae"]), two, 16, 2, rank=rank, token=token, **kw)
    a, b = LatentCache(one), LatentCache(two)
    assert a.index == b.index and len(a) == lookup.num_images()
    ka, _ = a.get(lookup.keys)
    kb, _ = b.get(lookup.keys)
    torch.testing.assert_close(ka, kb, rtol=1e-3, atol=1e-3)   # other batch sizes: float16 rounding apart
    assert not list(two.parent.glob("two.safetensors.*"))

    # cached latents == the VAE on the images the worker prepares at the VAE's size
    cfg = _cfg(env)
    prep = _preparer(env)
    cached = TrainBatchMaker.for_config(cfg, prep, lookup, a, rank=0)
    live = TrainBatchMaker.for_config(cfg, prep, lookup, vae, rank=0)
    assert live.vae_side == 16 and live.reader_image_size is None and cached.reader_image_size == 28
    raw = ShardDataset(env["shards"], batch_size=4, rank=0, world_size=1, load_images=True, image_size=28)
    batch = next(iter(raw))
    x, y = cached(batch, 0, 0), live(batch, 0, 0)
    assert torch.equal(x["has"], y["has"]) and x["has"].all()
    assert y["vae_images"].shape == (8, 3, 16, 16)
    torch.testing.assert_close(x["latents"], vae(y["vae_images"]), rtol=2e-3, atol=2e-3)   # float16 rows
    _assert_same(x["enc"], y["enc"])
    # the VAE's image comes from the stored bytes at its own size, not from the encoder's 28 px image
    first = lookup.position(batch["key"][0])
    assert torch.equal(y["vae_images"][0], lookup.image(first, 16))


def test_training_makes_the_cache_once_and_reads_it(env):
    from megarec.methods.utgrec.latent_cache import default_cache_path, read_metadata
    from megarec.methods.utgrec.tokenizer_run import run

    shards = env["root"] / "own_shards"
    shutil.copytree(env["shards"], shards, ignore=shutil.ignore_patterns("latents-*"))
    cfg = _cfg(env, env["root"] / "auto_cache", [("data.shards", str(shards)), ("train.max_steps", "2")])
    path = default_cache_path(shards, str(env["vae"]), 16, 2)
    assert not path.exists()
    result = run(cfg)
    assert path.is_file() and result["last"]["image"] > 0
    meta = read_metadata(path)
    assert (meta["image_size"], meta["patch"]) == ("16", "2") and len(json.loads(meta["item_keys"])) == 48


def _other_vae(env) -> Path:
    other = env["root"] / "vae_other"
    if not other.exists():
        shutil.copytree(env["vae"], other)
        conf = json.loads((other / "config.json").read_text())
        conf["scaling_factor"] = 0.5
        (other / "config.json").write_text(json.dumps(conf))
    return other


def test_latent_cache_of_another_vae_or_size_is_an_error_before_compute(env, monkeypatch):
    from megarec.data.domain import DataError
    from megarec.methods.utgrec import tokenizer
    from megarec.methods.utgrec.latent_cache import write_latent_cache
    from megarec.methods.utgrec.tokenizer_run import run

    cache = env["root"] / "cache_a.safetensors"
    write_latent_cache(env["shards"], str(env["vae"]), cache, 16, 2, progress=False)

    def no_build(*a, **k):
        raise AssertionError("the model was built before the bad latents file was found")

    monkeypatch.setattr(tokenizer, "build_model", no_build)
    with pytest.raises(DataError, match="another setup: VAE"):
        run(_cfg(env, env["root"] / "wrong_vae", [("utgrec.decoder.latents_file", str(cache)),
                                                  ("utgrec.decoder.vae_path", str(_other_vae(env)))]))
    with pytest.raises(DataError, match="image size 16, not utgrec.decoder.vae_image_size 32"):
        run(_cfg(env, env["root"] / "wrong_size", [("utgrec.decoder.latents_file", str(cache)),
                                                   ("utgrec.decoder.vae_image_size", "32")]))
    with pytest.raises(DataError, match="no latents file"):
        run(_cfg(env, env["root"] / "no_file", [("utgrec.decoder.latents_file", str(env["root"] / "none.st"))]))


def test_shards_without_images_are_an_error_when_the_config_asks_for_them(env, monkeypatch):
    from megarec.data.domain import DataError
    from megarec.data.readers import read_domain
    from megarec.data.shards import write_shards
    from megarec.methods.utgrec import tokenizer
    from megarec.methods.utgrec.tokenizer_run import run

    plain = env["root"] / "plain_shards"
    domains = [read_domain(p) for p in write_sample_domains(env["root"] / "plain_domains", 12)]
    write_shards(domains, plain, max_count=10, images="none")
    monkeypatch.setattr(tokenizer, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    with pytest.raises(DataError, match="no item of the shards has an image.*vae_path"):
        run(_cfg(env, env["root"] / "plain_run", [("data.shards", str(plain))]))


def test_encoder_image_size_sets_the_number_of_visual_tokens(env):
    from megarec.methods.utgrec.content_encoder import build_content_encoder
    from megarec.methods.utgrec.item_inputs import visual_side

    assert [visual_side(s) for s in (28, 40, 224, 256, 448)] == [28, 28, 224, 252, 448]
    im = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    counts = {}
    for size in (28, 56, 112):   # the tiny processor's own max_pixels (56 x 56) no longer caps it
        prep = _preparer(env, size)
        enc = prep.encoder_inputs(["red lamp"], [im])
        pad = prep.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        counts[size] = int((enc["input_ids"] == pad).sum())
        assert counts[size] == prep.visual_tokens() == int(enc["image_grid_thw"].prod()) // 4
    assert counts == {28: 1, 56: 4, 112: 16}
    qwen = build_content_encoder("qwen2vl", str(env["qwen"]), 3, image_size=56, max_text_tokens=16).eval()
    enc = qwen.prepare(["red lamp", "blue box"], [im, None])
    assert int((enc["input_ids"] == qwen.image_token_id).sum()) == 4
    assert qwen(**enc).shape[:2] == (2, 3)


def test_vae_every_step_with_workers_reads_its_own_size(env):
    """decoder.cache_latents false: the VAE runs in the main process on images the workers decoded at 16 px
    (the encoder's are 28 px): training runs and has an image loss."""
    from megarec.methods.utgrec.tokenizer_run import run

    result = run(_cfg(env, env["root"] / "live_vae", [("utgrec.decoder.cache_latents", "false"),
                                                      ("data.num_workers", "2"), ("train.max_steps", "2")]))
    assert result["global_step"] == 2 and result["last"]["image"] > 0


def test_resume_with_workers_is_exact(env, monkeypatch):
    """2 workers: a run preempted at step 3 and resumed ends with the weights of the uninterrupted run."""
    import os
    import signal
    import threading
    import time

    from megarec.engine import preemption
    from megarec.engine.checkpoint import read_weights
    from megarec.methods.utgrec.tokenizer_run import run

    extra = [("data.num_workers", "2"), ("train.max_steps", "4")]
    full = env["root"] / "workers_full"
    run(_cfg(env, full, extra))
    out = env["root"] / "workers_preempted"
    preemption.install(["USR1"])
    monkeypatch.setenv("MEGAREC_TEST_HANG_AFTER_STEP", "3")
    stop = threading.Event()

    def signal_at_the_hang() -> None:
        while not stop.is_set():
            if (out / "hanging_at_step3").exists():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    threading.Thread(target=signal_at_the_hang, daemon=True).start()
    try:
        with pytest.raises(preemption.Preempted):
            run(_cfg(env, out, extra))
    finally:
        stop.set()
        preemption.uninstall()
    monkeypatch.delenv("MEGAREC_TEST_HANG_AFTER_STEP")
    result = run(_cfg(env, out, extra + [("train.resume", "true")]))
    assert result["resumed_from_step"] == 3 and result["global_step"] == 4
    a, _ = read_weights(full)
    b, _ = read_weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_items_per_second_measures_the_loader(env):
    from megarec.methods.utgrec.data_rate import items_per_second

    r = items_per_second(_cfg(env), num_workers=1, seconds=0, max_batches=3)
    assert r["batches"] == 3 and r["items"] == 3 * 2 * 4 and r["items_per_s"] > 0
    assert r["items_per_s_per_worker"] == r["items_per_s"]
    # what the step computes on, per item: every sample item has a 28 px image = a 2 x 2 patch grid
    assert r["vision_patches_per_item"] == 4.0
    assert 4 < r["encoder_tokens_per_item"] <= r["encoder_padded_tokens_per_item"]
    assert 0 < r["text_targets_per_item"] <= 16
