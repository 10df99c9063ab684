"""The UTGRec tokenizer at scale, rehearsed small (issue 19, items 1 and 3): under ZeRO-3 the content encoder is
partitioned from the first byte (each of 2 CPU ranks holds about half of a mid-size Qwen2-VL right after
``build_model``, before any engine), the export folder holds only the trainable part (peft's adapter files,
loadable with ``PeftModel.from_pretrained``, and the tokenizer's own tensors), fine-tuning reads only those
files and takes the base from ``utgrec.encoder.path``, a 2-rank ZeRO-3 re-export gives the codes of the
single-rank run, and a bad model path fails before anything is built."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import launch, run_ranks, wait_ok, zero3_config
from tests.utgrec_fixtures import tiny_overrides, write_sample_shards

MID_TEXT = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]})
MID_VISION = dict(depth=1, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)


def _save_mid_qwen2vl(path: Path) -> Path:
    """A ~2.6M-parameter Qwen2-VL (hidden 256, 4 layers; 512 embedding rows, spare ones as in Qwen2-VL-2B) with
    weights on disk, loaded through ``from_pretrained``."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from tests.tiny_models import save_qwen2vl_config

    save_qwen2vl_config(path, text=MID_TEXT, vision=MID_VISION, image_pixels=(28 * 28, 56 * 56))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


def _partition_sizes(rank: int, world: int, qwen: str) -> dict:
    """Each base parameter's local and full size right after build_model under ZeRO-3 (loaded with
    ``from_pretrained``, and built from the config with ``random_init``), then one forward of the first."""
    from megarec.config import load_config
    from megarec.engine.deepspeed_setup import build_engine, resolve_ds_config
    from megarec.methods.utgrec.content_encoder import full_numel, local_numel
    from megarec.methods.utgrec.tokenizer import build_model
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    torch.set_num_threads(1)
    ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json").read_text())
    ds = resolve_ds_config(ds, micro_batch_size=2, lr=1e-3, weight_decay=0.0)
    out: dict = {}
    for random_init in (True, False):
        cfg = load_config(TrainTokenizerConfig, None, tiny_overrides(Path(qwen), None)
                          + [("utgrec.encoder.random_init", str(random_init).lower())])
        torch.manual_seed(0)
        model, _ = build_model(cfg.utgrec, ds_config=ds)
        out[random_init] = {n: (local_numel(p), full_numel(p), hasattr(p, "ds_id"))
                            for n, p in model.encoder.model.named_parameters()
                            if ".lora_" not in n and "trainable_tokens" not in n}
    engine = build_engine(model, ds)
    model.encoder.register_zero3_params()
    h = engine.module.code_inputs(**model.encoder.prepare(["a red pencil", "blue ink"], [None, None]))
    return {"sizes": out, "h": h.detach().float()}


@pytest.mark.slow
def test_zero3_partitions_the_frozen_base_from_load_on(tmp_path):
    qwen = _save_mid_qwen2vl(tmp_path / "mid")
    r0, r1 = run_ranks(_partition_sizes, 2, (str(qwen),), timeout=240)
    for random_init in (False, True):
        full = sum(f for _, f, _ in r0["sizes"][random_init].values())
        assert full > 2_000_000
        for r in (r0, r1):
            sizes = r["sizes"][random_init]
            for name, (loc, f, part) in sizes.items():
                assert part and loc <= (f + 1) // 2, (random_init, name)   # partitioned: half at most
            held = sum(loc for loc, _, _ in sizes.values())
            assert held <= 0.51 * full, (random_init, held, full)
    torch.testing.assert_close(r0["h"], r1["h"])          # the partitioned model runs (same input, same states)


# --------------------------------------------------------------------------- export folder, fine-tuning, re-export
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.tiny_models import save_tiny_qwen2vl

    root = tmp_path_factory.mktemp("utgrec_zinit")
    return {"root": root, "shards": write_sample_shards(root, n_items=23), "qwen": save_tiny_qwen2vl(root / "qwen")}


def _args(env, run_dir: Path, extra=()) -> list[tuple[str, str]]:
    o = tiny_overrides(env["qwen"], None)
    o += [("data.shards", str(env["shards"])), ("train.batch_size", "4"), ("train.max_steps", "3"),
          ("utgrec.loss.warmup_steps", "1"), ("train.run_dir", str(run_dir)), ("train.log_every", "1"),
          ("data.heldout_items", "8"), ("train.progress", "false"), ("train.lr", "3e-3"),
          ("export.domains", "Office"), ("export.batch_size", "4")]   # 23 items: uneven shares on 2 ranks
    return o + list(extra)


def _cfg(env, run_dir: Path, extra=()):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    return load_config(TrainTokenizerConfig, None, _args(env, run_dir, extra))


@pytest.fixture(scope="module")
def pretrained(env):
    from megarec.methods.utgrec.tokenizer_run import run

    run(_cfg(env, env["root"] / "pre"))
    return env["root"] / "pre"


def _build(env, path: Path | None = None):
    from megarec.methods.utgrec.tokenizer import build_model

    cfg = _cfg(env, env["root"] / "unused", [("utgrec.encoder.path", str(path or env["qwen"]))])
    torch.manual_seed(1)
    return build_model(cfg.utgrec)[0]


def test_export_holds_the_trainable_part_only(env, pretrained):
    from safetensors import safe_open

    from megarec.methods.utgrec.tokenizer_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_entries, split_names

    folder = pretrained / "model"
    assert {"model.safetensors", ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.yaml"} <= {p.name for p in folder.iterdir()}
    model = _build(env)
    tok, ada = split_names(model)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert meta["format"] == "megarec-utgrec-tokenizer/2"
    assert keys == set(tok) and not keys & set(base_entries(model))
    assert not any(".lora_" in k for k in keys) and any("trainable_tokens_delta" in k for k in keys)
    assert {"tree.root_W", "tree.root_E", "tree.leaf_E", "adapter.0.weight", "text_decoder.head.weight"} <= keys
    assert any(".lora_" in k for k in ada) and any(k.endswith("base_layer.weight") for k in base_entries(model))
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as fh:
        adapter_keys = set(fh.keys())
    assert len(adapter_keys) == len(ada) and all(".lora_" in k or "trainable_tokens" in k for k in adapter_keys)


def test_adapter_loads_with_peft_from_pretrained(env, pretrained):
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2VLModel

    from megarec.methods.utgrec.content_encoder import code_tokens
    from megarec.methods.utgrec.tokenizer_files import read_tokenizer

    folder = pretrained / "model"
    tok = AutoTokenizer.from_pretrained(env["qwen"])
    tok.add_tokens(code_tokens(3), special_tokens=True)
    base = Qwen2VLModel.from_pretrained(env["qwen"])
    base.resize_token_embeddings(len(tok))
    peft_model = PeftModel.from_pretrained(base, str(folder))
    loaded = dict(peft_model.named_parameters())
    ours = read_tokenizer(_build(env), pretrained)
    lora = {k: v for k, v in ours.items() if ".lora_" in k or "trainable_tokens_delta" in k}
    assert len(lora) > 4
    for k, v in lora.items():
        torch.testing.assert_close(loaded[k[len("encoder.model."):]].detach(), v, msg=k)
    assert any(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)   # trained (B starts at 0)


def test_finetuning_reads_only_the_trainable_files_and_takes_the_base_from_encoder_path(env, pretrained, monkeypatch):
    import shutil

    import safetensors
    from safetensors.torch import load_file, save_file

    from megarec.methods.utgrec.tokenizer_files import base_entries, load_tokenizer, read_tokenizer

    other = env["root"] / "qwen_other"       # the same architecture, one frozen base weight changed
    shutil.copytree(env["qwen"], other)
    w = load_file(str(other / "model.safetensors"))
    key = next(k for k in w if k.endswith("layers.0.mlp.down_proj.weight"))
    w[key] = torch.full_like(w[key], 0.125)
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})

    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, *a, **k: (opened.append(Path(p).name), real(p, *a, **k))[1])
    model = _build(env, other)
    opened.clear()
    load_tokenizer(model, pretrained)
    assert sorted(set(opened)) == ["adapter_model.safetensors", "model.safetensors"]
    want = read_tokenizer(_build(env), pretrained)
    state = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(state[k], v, msg=k)
    down = next(n for n in base_entries(model) if n.endswith("layers.0.mlp.down_proj.base_layer.weight"))
    assert torch.all(state[down] == 0.125)   # the base is the one of encoder.path, not from the export

    from megarec.methods.utgrec.tokenizer_run import run

    monkeypatch.undo()
    out = env["root"] / "ft"
    run(_cfg(env, out, [("train.init_from", str(pretrained / "model")), ("train.finetune", "true"),
                        ("utgrec.encoder.path", str(other)), ("train.max_steps", "1")]))
    after = load_file(str(out / "model" / "model.safetensors"))
    before = load_file(str(pretrained / "model" / "model.safetensors"))
    assert torch.equal(before["tree.root_E"], after["tree.root_E"]) and not torch.equal(before["tree.root_W"],
                                                                                        after["tree.root_W"])


def test_an_older_full_export_still_loads(env, pretrained, tmp_path):
    """A ``megarec-utgrec-tokenizer/1`` folder (one model.safetensors with the base inside) is read for its
    tokenizer entries only."""
    from safetensors.torch import save_file

    from megarec.methods.utgrec.tokenizer_files import load_tokenizer, read_tokenizer

    model = _build(env)
    load_tokenizer(model, pretrained)
    full = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model").mkdir()
    save_file(full, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "megarec-utgrec-tokenizer/1"})
    got = read_tokenizer(_build(env), tmp_path)
    want = read_tokenizer(_build(env), pretrained)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


@pytest.fixture(scope="module")
def reexport_zero3(env, pretrained):
    """train_tokenizer.py on 2 CPU ranks under ZeRO-3: no steps, init_from the single-rank run."""
    out = env["root"] / "reexport_z3"
    args = ["--deepspeed", zero3_config(env["root"] / "z3.json")]
    for k, v in _args(env, out, [("train.init_from", str(pretrained)), ("train.epochs", "0"),
                                 ("train.max_steps", "0")]):
        args += [f"--{k}", v]
    proc = launch("train_tokenizer", args, env["root"] / "reexport.log")
    wait_ok(proc, env["root"] / "reexport.log", timeout=300)
    return out


@pytest.mark.slow
def test_two_rank_zero3_reexport_equals_the_single_rank_export(pretrained, reexport_zero3):
    from megarec.data.codes import CodesFile

    a, b = CodesFile.load(pretrained / "codes.safetensors"), CodesFile.load(reexport_zero3 / "codes.safetensors")
    assert len(a.item_keys) == 23 and a.item_keys == b.item_keys
    assert (a.codes == b.codes).all()


@pytest.mark.slow
def test_two_rank_zero3_reexport_writes_the_same_trainable_files(pretrained, reexport_zero3):
    from safetensors.torch import load_file

    for f in ("model.safetensors", "adapter_model.safetensors"):
        x, y = load_file(str(pretrained / "model" / f)), load_file(str(reexport_zero3 / "model" / f))
        assert x.keys() == y.keys(), f
        for k in x:
            torch.testing.assert_close(y[k], x[k], msg=k)
    m = json.loads((reexport_zero3 / "metrics.json").read_text())
    assert m["global_step"] == 0


def test_encode_catalogue_gathers_uneven_shares_in_order():
    r0, r1 = run_ranks(_encode_shares, 2, (7, 3))
    want = torch.arange(7, dtype=torch.float32).view(7, 1, 1).expand(7, 2, 4)
    torch.testing.assert_close(r0, want)
    torch.testing.assert_close(r1, want)


class _FakeTree:
    num_levels, dim = 2, 4


class _FakeModule(torch.nn.Module):
    tree = _FakeTree()

    def code_inputs(self, pos: torch.Tensor) -> torch.Tensor:
        return pos.float().view(-1, 1, 1).expand(-1, 2, 4)


class _FakeBatcher:
    device = torch.device("cpu")

    def encode_inputs(self, positions):
        return {"pos": torch.as_tensor(positions)}


def _encode_shares(rank: int, world: int, n: int, batch: int) -> torch.Tensor:
    import numpy as np

    from megarec.methods.utgrec.batches import encode_catalogue

    return encode_catalogue(_FakeModule(), _FakeBatcher(), np.arange(n, dtype=np.int64), batch)


# --------------------------------------------------------------------------- a bad model path
@pytest.mark.parametrize("kind", ["missing", "no_config", "not_qwen"])
def test_a_bad_encoder_path_fails_before_anything_is_built(env, tmp_path, monkeypatch, kind):
    from megarec.data.domain import DataError
    from megarec.methods.utgrec import tokenizer
    from megarec.methods.utgrec.tokenizer_run import run

    path = tmp_path / "model"
    if kind != "missing":
        path.mkdir()
    if kind == "not_qwen":
        (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))

    def never(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(tokenizer, "build_model", never)
    msg = {"missing": "no such model folder", "no_config": "no config.json", "not_qwen": "not Qwen2-VL"}[kind]
    with pytest.raises(DataError, match=msg):
        run(_cfg(env, tmp_path / "run", [("utgrec.encoder.path", str(path))]))
