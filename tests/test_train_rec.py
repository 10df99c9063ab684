"""train_rec.py and the engine on one CPU rank: ds config resolution, samplers, LR schedule,
early stopping, the TIGER / SASRec loops, exports, fine-tuning, `megarec recommend`, errors.

The 2-rank DeepSpeed launcher test (ZeRO-3, kill and resume) is in test_train_rec_dist.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megarec.config import ConfigError
from megarec.data.codes import CodesFile
from megarec.engine.deepspeed_setup import resolve_ds_config
from megarec.engine.sampler import epoch_batches, eval_batches
from megarec.engine.trainer import EarlyStopping

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tiny data
def write_domain(root: Path, name: str, n_users: int, n_items: int, seed: int = 0) -> Path:
    """A json-layout domain whose users walk the items in order (i -> i+1), so models can learn it."""
    rng = np.random.default_rng(seed)
    inter = {}
    for u in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(5, 9))
        inter[f"u{u}"] = [str((start + k) % n_items) for k in range(length)]
    items = {str(i): {"title": f"{name} item {i}", "brand": f"brand {i % 3}", "categories": "", "description": ""}
             for i in range(n_items)}
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.inter.json").write_text(json.dumps(inter))
    (d / f"{name}.item.json").write_text(json.dumps(items))
    return d


def write_codes(path: Path, domains: list[tuple[str, int]], sizes: list[int]) -> Path:
    """Unique codes: item position written in mixed radix over ``sizes``."""
    keys = [f"{name}/{i}" for name, n in domains for i in range(n)]
    if len(keys) > int(np.prod(sizes)):
        raise ValueError("codebooks too small for unique codes")
    codes, rest = [], np.arange(len(keys))
    for k in reversed(sizes):
        codes.append(rest % k)
        rest = rest // k
    CodesFile(keys, np.stack(codes[::-1], 1), sizes).save(path)
    return path


# methods.training.run starts a 1-rank gloo group in this process and leaves it up: DeepSpeed caches its
# groups, so a destroyed group cannot be started again in the same process.


TINY = ["--profile", "tiny", "--train.progress", "false", "--train.log_every", "2"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiger_run(tmp_path_factory):
    """TIGER pre-trained on two domains (A, B) in one code space, 8 short epochs."""
    from megarec.train_rec import main

    root = tmp_path_factory.mktemp("tiger")
    a, b = write_domain(root, "A", 40, 20, seed=1), write_domain(root, "B", 30, 15, seed=2)
    codes = write_codes(root / "codes.safetensors", [("A", 20), ("B", 15)], [3, 3, 4])
    run = root / "run"
    rc = main([*TINY, "--method", "tiger", "--data.paths", f"{a},{b}", "--data.codes", str(codes),
               "--train.run_dir", str(run), "--train.epochs", "8", "--train.batch_size", "16", "--train.lr", "0.01",
               "--train.eval_every", "4"])
    assert rc == 0
    return {"root": root, "a": a, "b": b, "codes": codes, "run": run}


# --------------------------------------------------------------------------- ds configs
@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_hpz.json", "zero3_offload.json"])
def test_ds_configs_resolve_on_cpu(name):
    cfg = resolve_ds_config(REPO / "ds_configs" / name, micro_batch_size=32, lr=3e-3, weight_decay=0.05,
                            accelerator="cpu")
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["bf16"]["enabled"] is False
    assert cfg["optimizer"]["params"]["lr"] == 3e-3 and cfg["optimizer"]["params"]["weight_decay"] == 0.05
    offload = "offload_optimizer" in cfg["zero_optimization"]
    assert cfg["optimizer"]["params"].get("torch_adam", False) is (not offload)
    assert cfg["optimizer"]["params"].get("fused", False) is (not offload)   # in place: no foreach temporaries
    assert "auto" not in json.dumps(cfg)


def test_ds_config_bf16_on_gpu_and_errors(tmp_path):
    gpu = resolve_ds_config(REPO / "ds_configs" / "zero3.json", micro_batch_size=8, lr=1e-3, weight_decay=0.0,
                            accelerator="cuda")
    from deepspeed.accelerator import get_accelerator

    assert gpu["bf16"]["enabled"] is bool(get_accelerator().is_bf16_supported())
    assert "torch_adam" not in gpu["optimizer"]["params"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        resolve_ds_config(bad, micro_batch_size=8, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ds_config(tmp_path / "missing.json", micro_batch_size=8, lr=1e-3, weight_decay=0.0)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_ds_config(bad, micro_batch_size=8, lr=1e-3, weight_decay=0.0)


# --------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("n,bs,world", [(10, 3, 1), (10, 3, 2), (7, 4, 3), (2, 5, 4)])
def test_epoch_batches_split_ranks_evenly(n, bs, world):
    per_rank = [epoch_batches(n, bs, epoch=3, seed=7, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1                       # same number of steps on every rank
    assert len({tuple(len(x) for x in b) for b in per_rank}) == 1     # and the same batch sizes
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(seen.tolist()) == set(range(n)) and len(seen) == math.ceil(n / world) * world
    again = epoch_batches(n, bs, epoch=3, seed=7, rank=0, world=world)
    assert all(np.array_equal(x, y) for x, y in zip(per_rank[0], again))      # resumable: same order
    other = np.concatenate(epoch_batches(100, 10, epoch=4, seed=7))
    assert not np.array_equal(np.concatenate(epoch_batches(100, 10, epoch=3, seed=7)), other)


@pytest.mark.parametrize("n,bs,world,window", [(103, 8, 1, 4), (103, 8, 2, 4), (50, 7, 3, 2), (5, 8, 2, 50)])
def test_grouped_batches_cover_the_epoch_like_random_ones(n, bs, world, window):
    """Same samples, same batch count per rank as the random order; depends only on (seed, epoch)."""
    from megarec.engine.sampler import batches_per_epoch, grouped_epoch_batches

    lengths = np.random.default_rng(0).integers(1, 80, n)
    per_rank = [grouped_epoch_batches(lengths, bs, 3, 7, r, world, window) for r in range(world)]
    rnd = [epoch_batches(n, bs, 3, 7, r, world) for r in range(world)]
    assert all(len(b) == batches_per_epoch(n, bs, world) for b in per_rank)
    assert sorted(np.concatenate([np.concatenate(b) for b in per_rank])) == \
        sorted(np.concatenate([np.concatenate(b) for b in rnd]))          # the same multiset (wrap-around too)
    again = grouped_epoch_batches(lengths, bs, 3, 7, 0, world, window)
    assert all(np.array_equal(x, y) for x, y in zip(again, per_rank[0]))
    other = grouped_epoch_batches(lengths, bs, 4, 7, 0, world, window)
    assert len(other) == 1 or not all(np.array_equal(x, y) for x, y in zip(other, per_rank[0]))
    for r in range(1, world):      # a global batch is dealt row by row: ranks see equal batch sizes
        assert [len(b) for b in per_rank[r]] == [len(b) for b in per_rank[0]]


def test_grouped_batches_cut_padding():
    """On skewed lengths (most histories short, a few long: the sliding-window samples) grouped
    batches pad far less than random ones."""
    from megarec.engine.sampler import grouped_epoch_batches

    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.geometric(0.25, 20000), 21) * 4 + 1
    def real_fraction(batches):
        return sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches)
    rnd = real_fraction(epoch_batches(len(lengths), 256, 0, 0))
    grp = real_fraction(grouped_epoch_batches(lengths, 256, 0, 0, window=50))
    assert rnd < 0.3 and grp > 0.9, (rnd, grp)
    # window=1 keeps the random batches (only sorted inside each), so the same padding
    one = real_fraction(grouped_epoch_batches(lengths, 256, 0, 0, window=1))
    assert one == pytest.approx(rnd)


def test_eval_batches_grouped_by_length_cover_each_sample_once():
    lengths = np.array([3, 9, 1, 7, 7, 2, 5])
    for world in (1, 2, 3):
        seen = []
        for r in range(world):
            for eb in eval_batches(len(lengths), 2, r, world, lengths):
                seen += list(eb.indices[: eb.num_real])
        assert sorted(seen) == list(range(len(lengths)))
    first = eval_batches(len(lengths), 2, 0, 1, lengths)[0]
    assert list(first.indices) == [1, 3]       # longest first


@pytest.mark.parametrize("n,bs,world", [(10, 3, 2), (5, 8, 3), (1, 2, 2), (9, 3, 3)])
def test_eval_batches_cover_each_sample_once(n, bs, world):
    per_rank = [eval_batches(n, bs, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    real = np.concatenate([eb.indices[:eb.num_real] for b in per_rank for eb in b])
    assert sorted(real.tolist()) == list(range(n))
    assert all(len(eb.indices) >= max(eb.num_real, 1) for b in per_rank for eb in b)


def test_early_stopping():
    es = EarlyStopping(patience=2)
    assert [es.update(v, e) for e, v in enumerate([0.1, 0.3, 0.3, 0.2])] == [True, True, False, False]
    assert es.should_stop and es.best == 0.3 and es.best_epoch == 1
    es2 = EarlyStopping(patience=2)
    es2.load_state_dict(es.state_dict())
    assert es2.should_stop and es2.best_epoch == 1
    never = EarlyStopping(patience=0)
    for e in range(20):
        never.update(0.0, e)
    assert not never.should_stop


# --------------------------------------------------------------------------- engine + loop on a toy model
def _toy_engine(lr=0.1, warmup=4, total=20, min_ratio=0.1):
    from megarec.engine.deepspeed_setup import WarmupCosine, build_engine

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ds = resolve_ds_config(None, micro_batch_size=4, lr=lr, weight_decay=0.0)
    return build_engine(model, ds, WarmupCosine(warmup, total, min_ratio))


@pytest.mark.parametrize("warmup", [0, 4])
def test_warmup_cosine_schedule(warmup):
    """The LR each optimizer step ran with: linear warmup to the peak, cosine to 0.1 * peak at step 20."""
    engine = _toy_engine(warmup=warmup)
    x = torch.randn(4, 3)
    used = []
    for _ in range(24):
        used.append(engine.get_lr()[0])
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    for s, lr in enumerate(used):     # s = 0-based step
        if s < warmup:
            want = 0.1 * (s + 1) / warmup
        else:
            p = min(1.0, (s - warmup) / (20 - warmup))
            want = 0.1 * (0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2)
        assert lr == pytest.approx(want, rel=1e-6), s
    assert used[0] > 0 and used[warmup] == pytest.approx(0.1) and used[-1] == pytest.approx(0.01)


def test_trainer_early_stops_and_tests_best_weights(tmp_path):
    """Scripted validation scores: best at epoch 1, patience 2 -> stop after epoch 3; the test pass
    must see the weights exported at epoch 1, not the last ones."""
    from megarec.engine.trainer import LoopConfig, Trainer, TrainTask

    engine = _toy_engine(total=100)
    xs, ys = torch.randn(32, 3), torch.randn(32, 1)
    scores = iter([0.1, 0.5, 0.4, 0.45, 0.9, 0.9])
    seen = {}

    def evaluate(module, split):
        w = module.weight.detach().clone()
        if split == "test":
            seen["test"] = w
            return {"ndcg@10": 0.0}
        seen.setdefault("valid", []).append(w)
        return {"ndcg@10": next(scores)}

    task = TrainTask(num_samples=32, batch=lambda idx: (xs[idx], ys[idx]),
                     loss=lambda eng, b: {"loss": (eng(b[0]) - b[1]).pow(2).mean()}, evaluate=evaluate)
    result = Trainer(engine, task, LoopConfig(epochs=10, batch_size=8, patience=2, log_every=3, progress=False),
                     tmp_path / "run").fit()
    assert result["epochs_run"] == 4 and result["best_epoch"] == 1 and result["global_step"] == 16
    assert len(seen["valid"]) == 4
    torch.testing.assert_close(seen["test"], seen["valid"][1])
    assert not torch.equal(seen["valid"][1], seen["valid"][3])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_valid"] == 0.5


def test_epoch_hooks_and_gates_freeze_a_group(tmp_path):
    """A method's epoch hooks drive ``lr_gates``: a group gated to 0 does not move in that epoch
    although AdamW still holds momentum for it; the other group trains; hooks see every epoch."""
    from megarec.engine.deepspeed_setup import WarmupCosine, build_engine
    from megarec.engine.param_groups import param_groups
    from megarec.engine.trainer import LoopConfig, Trainer, TrainTask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    ds = resolve_ds_config(None, micro_batch_size=8, lr=0.05, weight_decay=0.1)
    groups = param_groups(model, 0.1, lr_scales={"1.": 0.5})
    gates: dict[str, float] = {}
    engine = build_engine(model, ds, WarmupCosine(0, 100, 1.0), model_parameters=groups, gates=gates)
    xs, ys = torch.randn(32, 3), torch.randn(32, 1)
    snaps, calls = [], []

    def start(epoch):
        calls.append(("start", epoch))
        gates["1."] = 0.0 if epoch % 2 else 1.0          # freeze the second layer in odd epochs
        snaps.append([p.detach().clone() for p in model.parameters()])

    task = TrainTask(num_samples=32, batch=lambda idx: (xs[idx], ys[idx]),
                     loss=lambda eng, b: {"loss": (eng(b[0]) - b[1]).pow(2).mean()},
                     evaluate=lambda m, split: {"ndcg@10": 0.0}, on_epoch_start=start,
                     on_epoch_end=lambda e: calls.append(("end", e)), lr_gates=gates)
    Trainer(engine, task, LoopConfig(epochs=3, batch_size=8, patience=0, progress=False), tmp_path / "r").fit()
    after = [p.detach().clone() for p in model.parameters()]
    assert calls == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    first, second = [0, 1], [2, 3]       # parameter indices of the two layers
    for i in second:   # frozen through epoch 1 (momentum from epoch 0 notwithstanding)
        assert torch.equal(snaps[1][i], snaps[2][i]) and not torch.equal(snaps[0][i], snaps[1][i])
    for i in first:
        assert not torch.equal(snaps[1][i], snaps[2][i]) and not torch.equal(snaps[2][i], after[i])
    lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert lrs["1.decay"] == pytest.approx(0.5 * lrs["decay"])      # epoch 2: gate back to 1


def test_cpu_bf16_autocast_trains(tmp_path):
    """``train.cpu_bf16``: the training forward runs under bf16 autocast; weights stay fp32."""
    from megarec.engine.trainer import LoopConfig, Trainer, TrainTask

    engine = _toy_engine(total=100)
    xs, ys = torch.randn(32, 3), torch.randn(32, 1)
    dtypes = set()

    def loss(eng, b):
        out = eng(b[0])
        dtypes.add(out.dtype)
        return {"loss": (out.float() - b[1]).pow(2).mean()}

    task = TrainTask(num_samples=32, batch=lambda idx: (xs[idx], ys[idx]), loss=loss,
                     evaluate=lambda m, split: {"ndcg@10": 0.0})
    Trainer(engine, task, LoopConfig(epochs=1, batch_size=8, progress=False, cpu_bf16=True), tmp_path / "r").fit()
    assert torch.bfloat16 in dtypes and engine.module.weight.dtype == torch.float32


# --------------------------------------------------------------------------- TIGER / SASRec runs
def test_no_deepspeed_shm_buffers_left_behind(tiger_run):
    """DeepSpeed's CPU all-reduce buffers (69 MB each in /dev/shm) are unlinked once mapped:
    left behind, every run adds some until the machine runs out of memory."""
    import glob
    import os

    port = os.environ["MASTER_PORT"]     # this process's 1-rank group, which trained tiger_run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def test_tiger_run_outputs(tiger_run):
    run = tiger_run["run"]
    m = _metrics(run)
    assert m["epochs_run"] == 8 and [h["epoch"] for h in m["valid_history"]] == [3, 7]
    assert set(m["test"]) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "A/ndcg@10", "B/recall@5"}
    assert m["test"]["count"] == 70 and m["test"]["A/count"] == 40
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert 0.0 <= m["test"][k] <= 1.0
    assert m["test"]["ndcg@10"] <= m["test"]["recall@10"]
    for f in ("model/model.safetensors", "model/config.yaml", "model/codes.safetensors", "config.yaml",
              "checkpoints/latest"):
        assert (run / f).is_file(), f
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["method"] == "tiger" and json.loads(meta["config"])["data"]["codes"] == str(tiger_run["codes"])


def test_tiger_learns_and_logs_stable_tags(tiger_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiger_run["run"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "perf/samples_per_s", "perf/memory_gb", "train/lr", "eval/ndcg@10", "eval/recall@5",
            "eval/A/ndcg@10", "test/ndcg@10", "test/recall@10"} <= tags
    losses = [e.value for e in acc.Scalars("loss/loss")]
    assert losses[-1] < losses[0] * 0.8
    # users walk the items in order: a trained model ranks the next item far above chance
    # (Recall@5 of a random ranking: 5/20 on A, 5/15 on B)
    assert _metrics(tiger_run["run"])["test"]["recall@5"] > 0.6


def test_finetune_from_pretrained_on_one_domain(tiger_run, tmp_path):
    """--init_from loads the pre-trained weights; the shared codes file covers more items than B."""
    from megarec.engine.checkpoint import read_weights
    from megarec.train_rec import main

    run = tmp_path / "ft"
    rc = main([*TINY, "--method", "tiger", "--data.paths", str(tiger_run["b"]), "--data.codes",
               str(tiger_run["codes"]), "--train.run_dir", str(run), "--train.epochs", "0", "--init_from",
               str(tiger_run["run"])])
    assert rc == 0
    pre, _ = read_weights(tiger_run["run"] / "model" / "model.safetensors")
    ft, _ = read_weights(run)
    assert pre.keys() == ft.keys() and all(torch.equal(pre[k], ft[k]) for k in pre)
    assert _metrics(run)["test"]["count"] == 30
    # weights of another architecture are a clear error
    rc = main([*TINY, "--method", "tiger", "--data.paths", str(tiger_run["b"]), "--data.codes",
               str(tiger_run["codes"]), "--train.run_dir", str(tmp_path / "ft2"), "--train.epochs", "0",
               "--tiger.d_model", "48", "--init_from", str(tiger_run["run"])])
    assert rc == 2


def test_codes_mismatch_fails_before_training(tiger_run, tmp_path, capsys):
    from megarec.cli import main as cli

    other = write_codes(tmp_path / "other.safetensors", [("A", 20)], [3, 3, 4])
    run = tmp_path / "mismatch"
    rc = cli(["train-rec", *TINY, "--method", "tiger", "--data.paths", f"{tiger_run['a']},{tiger_run['b']}",
              "--data.codes", str(other), "--train.run_dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match" in err and "B/0" in err and str(other) in err
    assert not run.exists()
    rc = cli(["train-rec", "--method", "tiger", "--data.paths", str(tiger_run["a"]), "--train.run_dir", str(run)])
    assert rc == 2 and "data.codes" in capsys.readouterr().err


def test_run_dir_with_checkpoints_needs_resume(tiger_run, capsys):
    from megarec.train_rec import main

    rc = main([*TINY, "--method", "tiger", "--data.paths", f"{tiger_run['a']},{tiger_run['b']}", "--data.codes",
               str(tiger_run["codes"]), "--train.run_dir", str(tiger_run["run"])])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_recommend_command(tiger_run, tmp_path, capsys):
    from megarec.cli import main as cli

    hist = tmp_path / "h.jsonl"
    hist.write_text('["3", "4", "5"]\n{"user": "me", "history": ["A/10", "11"]}\n')
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--domain", "A", "--histories", str(hist),
                "--topk", "4"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[1]["user"] == "me"
    for r in rows:
        assert len(r["recommendations"]) == 4 and r["domain"] == "A"
        ids = [x["item"] for x in r["recommendations"]]
        assert len(set(ids)) == 4 and all(0 <= int(i) < 20 for i in ids)
        assert all(x["title"] == f"A item {x['item']}" for x in r["recommendations"])
        assert [x["score"] for x in r["recommendations"]] == sorted((x["score"] for x in r["recommendations"]),
                                                                      reverse=True)
    # the model learned "next item in order"
    assert "6" in [x["item"] for x in rows[0]["recommendations"]]
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--domain", "B", "--user", "u0", "u1",
                "--topk", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["user"] for r in rows] == ["u0", "u1"] and all(len(r["recommendations"]) == 2 for r in rows)
    # bad inputs: unknown item, unknown user, no --domain on a two-domain model, broken JSON line
    hist.write_text('["3", "999"]\n')
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--domain", "A", "--histories", str(hist)]) == 2
    assert "999" in capsys.readouterr().err
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--domain", "A", "--user", "nobody"]) == 2
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--user", "u0"]) == 2
    assert "--domain" in capsys.readouterr().err
    hist.write_text('["3"]\n[oops\n')
    assert cli(["recommend", "--model", str(tiger_run["run"]), "--domain", "A", "--histories", str(hist)]) == 2
    assert f"{hist}:2" in capsys.readouterr().err


def test_sasrec_run_and_recommend(tmp_path, capsys):
    from megarec.cli import main as cli
    from megarec.train_rec import main

    a = write_domain(tmp_path, "A", 40, 20, seed=3)
    run = tmp_path / "sas"
    assert main([*TINY, "--method", "sasrec", "--data.paths", str(a), "--train.run_dir", str(run),
                 "--train.epochs", "8", "--train.batch_size", "16", "--train.lr", "0.01",
                 "--train.eval_every", "4"]) == 0
    m = _metrics(run)
    assert m["test"]["count"] == 40 and m["epochs_run"] == 8
    assert m["test"]["recall@5"] > 0.6       # chance: 5/20
    capsys.readouterr()
    assert cli(["recommend", "--model", str(run), "--user", "u3", "--topk", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["recommendations"]) == 3 and not (run / "model" / "codes.safetensors").exists()


def test_profiles_are_valid_configs():
    """Every registered method ships the four standard profiles; each validates, and so do
    its pipeline stages' settings."""
    from megarec.config import TokenizerConfig, load_config
    from megarec.methods import method_names
    from megarec.methods.profiles import STANDARD, flatten, load_profile, profile_names
    from megarec.methods.training import TrainRecConfig, profile_layer

    for method in method_names():
        assert set(STANDARD) <= set(profile_names(method)), method
        for profile in STANDARD:
            cfg = load_config(TrainRecConfig, None, [("method", method)], base=[profile_layer(method, profile)])
            assert cfg.train.beam_size >= 10
            tok = load_profile(method, profile).stages.get("tokenizer")
            if tok is not None and method == "tiger":
                load_config(TokenizerConfig, None, [(k, ",".join(map(str, v)) if isinstance(v, list) else str(v))
                                                    for k, v in flatten(tok)])
    sas = load_config(TrainRecConfig, None, [("method", "sasrec")], base=[profile_layer("sasrec", "paper")])
    # PROTOCOL.md: RecBole SASRec, lr 1e-3 (constant), batch 256, patience 10, 2 layers/heads, hidden 64, no clipping
    assert (sas.train.lr, sas.train.min_lr_ratio, sas.train.batch_size, sas.train.patience) == (1e-3, 1.0, 256, 10)
    assert sas.train.grad_clip == 0.0 and sas.train.weight_decay == 0.0
    assert (sas.sasrec.num_layers, sas.sasrec.num_heads, sas.sasrec.hidden, sas.sasrec.inner, sas.sasrec.dropout) == \
        (2, 2, 64, 256, 0.5)
    with pytest.raises(ConfigError, match="no settings for method 'tiger'; choose from paper, cpu-small"):
        profile_layer("tiger", "huge")


def test_precedence_defaults_profile_file_command_line(tmp_path):
    """defaults < profile < the user's config file < command-line overrides."""
    from megarec.train_rec import parse_args

    f = tmp_path / "my.yaml"
    f.write_text("method: tiger\ntrain:\n  epochs: 3\n  lr: 0.5\n")
    cfg = parse_args(["--config", str(f), "--profile", "tiny", "--train.lr", "0.25"])
    assert cfg.train.epochs == 3            # the file beats the profile (tiny: 2)
    assert cfg.train.lr == 0.25             # the command line beats the file
    assert cfg.tiger.d_model == 32          # the profile beats the defaults (128)
    assert cfg.train.weight_decay == 0.05   # untouched default
    cfg = parse_args(["--profile", "tiny", "--method", "sasrec"])   # the command line's method picks the profile
    assert cfg.sasrec.hidden == 16 and cfg.train.epochs == 2


def test_entry_points_name_no_method():
    """The entry points, the run of a method and the trainer never test a method's or a tokenizer's name
    (no comparison with one, no ``match`` on one): methods and tokenizers are plug-ins, reached through
    their registries."""
    import ast

    import megarec
    from megarec.methods import method_names
    from megarec.methods.tokenizers import tokenizer_names

    names = {*method_names(), *tokenizer_names()}
    root = Path(megarec.__file__).parent
    files = [root / f for f in ("train_rec.py", "train_tokenizer.py", "cli.py", "quickstart.py", "entry_point.py",
                                "methods/training.py")] + sorted((root / "engine").glob("*.py"))

    def constants(node: ast.AST) -> set:
        if isinstance(node, ast.Constant):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant)}
        return set()

    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            tested = set()
            if isinstance(node, ast.Compare):
                for operand in (node.left, *node.comparators):
                    tested |= constants(operand)
            elif isinstance(node, ast.match_case):
                tested |= {n.value.value for n in ast.walk(node.pattern) if isinstance(n, ast.MatchValue)
                           and isinstance(n.value, ast.Constant)}
            assert not tested & names, (path.name, getattr(node, "lineno", None), tested & names)
