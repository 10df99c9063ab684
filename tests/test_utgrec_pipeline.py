"""UTGRec stage 2 end to end (``method: utgrec``, profile tiny, the bundled MiniLM text backend): tokenizer
pre-training on two domains -> their codes -> T5 pre-training -> tokenizer fine-tuning on a third -> T5
fine-tuning; the nopt ablation; reruns that reuse finished stages; the stage commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_train_rec import write_domain
from tests.tools import load_tool

STAGES = ("shards_target", "shards_pretrain", "tokenizer_pretrain", "rec_pretrain", "tokenizer_finetune")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("utgrec_pipeline")
    paths = {n: write_domain(root / "data", n, n_users=30, n_items=20, seed=s)
             for s, n in enumerate(("A", "B", "T"))}
    return {"root": root, "paths": paths}


def _pretrain_override(env) -> list[tuple[str, str]]:
    return [("utgrec.pretrain_paths", f"{env['paths']['A']},{env['paths']['B']}")]


@pytest.fixture(scope="module")
def pipeline(env):
    from megarec.methods.training import run_pipeline

    out = env["root"] / "pt"
    res = run_pipeline("utgrec", [env["paths"]["T"]], out, profile="tiny", overrides=_pretrain_override(env),
                       progress=False)
    return out, res


def _codes(path: Path):
    from megarec.data.codes import CodesFile

    return CodesFile.load(path)


def test_every_stage_writes_its_outputs(pipeline):
    out, res = pipeline
    for stage in STAGES:
        assert stage in res and res[stage]["reused"] is False, stage
    for f in ("shards/pretrain/index.json", "shards/target/index.json",
              "tokenizer_pretrain/codes.safetensors", "tokenizer_pretrain/model/model.safetensors",
              "rec_pretrain/model/model.safetensors", "rec_pretrain/metrics.json",
              "tokenizer_finetune/codes.safetensors", "tokenizer_finetune/model/model.safetensors",
              "rec/model/model.safetensors", "rec/model/codes.safetensors", "rec/metrics.json"):
        assert (out / f).is_file(), f
    for stage in ("tokenizer_pretrain", "rec_pretrain", "tokenizer_finetune"):
        assert json.loads((out / stage / "stage.json").read_text())["done"] is True
    assert 0.0 <= res["test"]["ndcg@10"] <= res["test"]["recall@10"] <= 1.0
    from megarec.methods.training import load_trained   # `megarec recommend` loads it like a TIGER model

    trained = load_trained(out / "rec")
    items, _ = trained.recommender.recommend([trained.domains[0].sequences[0]], 5)
    assert items.shape == (1, 5) and int(items.max()) < 20


def test_codes_unique_across_pretrain_domains_and_collision_free_on_target(pipeline):
    out, _ = pipeline
    pre = _codes(out / "tokenizer_pretrain" / "codes.safetensors")
    assert {k.split("/")[0] for k in pre.item_keys} == {"A", "B"} and len(pre.item_keys) == 40
    assert len({tuple(r) for r in pre.codes.tolist()}) == 40          # unique over the merged catalogue
    tgt = _codes(out / "tokenizer_finetune" / "codes.safetensors")
    assert {k.split("/")[0] for k in tgt.item_keys} == {"T"} and len(tgt.item_keys) == 20
    assert len({tuple(r) for r in tgt.codes.tolist()}) == 20 and tgt.stats["collision_rate_after"] == 0.0
    assert list(tgt.codebook_sizes) == list(pre.codebook_sizes)         # one T5 vocabulary for both


def test_tokenizer_finetuning_kept_E_and_started_from_pretrained(pipeline):
    from megarec.engine.checkpoint import read_weights

    out, _ = pipeline
    pre, _ = read_weights(out / "tokenizer_pretrain" / "model")
    ft, _ = read_weights(out / "tokenizer_finetune" / "model")
    assert torch.equal(pre["tree.root_E"], ft["tree.root_E"]) and torch.equal(pre["tree.leaf_E"], ft["tree.leaf_E"])
    assert not torch.equal(pre["tree.root_W"], ft["tree.root_W"])


def test_finetuned_recommender_starts_from_the_pretrained_one(pipeline):
    """The final model lies much nearer the pre-trained T5 than a from-scratch init with the run's seed
    (fails if train.init_from were ignored)."""
    from megarec.config import load_config
    from megarec.data.code_vocab import CodeVocab
    from megarec.engine.checkpoint import read_weights
    from megarec.recommender.t5 import GenerativeRecommender
    from megarec.methods.training import TrainRecConfig

    out, _ = pipeline
    cfg = load_config(TrainRecConfig, out / "rec" / "config.yaml")
    assert Path(cfg.train.init_from) == (out / "rec_pretrain" / "model").resolve()
    assert Path(cfg.data.codes) == (out / "tokenizer_finetune" / "codes.safetensors").resolve()
    pre, _ = read_weights(out / "rec_pretrain" / "model")
    final, _ = read_weights(out / "rec" / "model")
    torch.manual_seed(cfg.train.seed)
    scratch = GenerativeRecommender(cfg.tiger, CodeVocab(_codes(cfg.data.codes).codebook_sizes)).state_dict()
    keys = [k for k in final if k in scratch and final[k].is_floating_point()]
    dist = lambda a, b: sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys)  # noqa: E731
    assert dist(final, pre) < 0.25 * dist(final, scratch)     # squared distances: ~0.1 here, ~1 if not


def test_rerun_reuses_finished_stages_and_redoes_changed_ones(env, pipeline):
    import time

    from megarec.methods import get_method
    from megarec.methods.profiles import flatten, load_profile
    from megarec.methods.training import pipeline_config, read_domains

    out, _ = pipeline
    stages = {k: flatten(v) for k, v in load_profile("utgrec", "tiny").stages.items()}
    cfg = pipeline_config("utgrec", [env["paths"]["T"]], out, "tiny", _pretrain_override(env), progress=False)
    before = (out / "rec_pretrain" / "model" / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    again = get_method("utgrec").prepare_inputs(cfg, read_domains(cfg.data), out, stages, progress=False)
    assert time.perf_counter() - t < 10
    assert all(again[s]["reused"] for s in STAGES)
    assert (out / "rec_pretrain" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert cfg.train.init_from == str((out / "rec_pretrain" / "model").resolve())
    # a changed fine-tuning setting redoes that stage only
    stages["tokenizer_finetune"] = stages["tokenizer_finetune"] + [("train.max_steps", 2)]
    cfg = pipeline_config("utgrec", [env["paths"]["T"]], out, "tiny", _pretrain_override(env), progress=False)
    changed = get_method("utgrec").prepare_inputs(cfg, read_domains(cfg.data), out, stages, progress=False)
    assert changed["tokenizer_pretrain"]["reused"] and changed["rec_pretrain"]["reused"]
    assert not changed["tokenizer_finetune"]["reused"] and changed["tokenizer_finetune"]["global_step"] == 2
    # an unfinished stage (stage.json not done) with the same settings resumes from its checkpoint
    stamp = out / "tokenizer_finetune" / "stage.json"
    record = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**record, "done": False}))
    cfg = pipeline_config("utgrec", [env["paths"]["T"]], out, "tiny", _pretrain_override(env), progress=False)
    resumed = get_method("utgrec").prepare_inputs(cfg, read_domains(cfg.data), out, stages, progress=False)
    assert not resumed["tokenizer_finetune"]["reused"] and resumed["tokenizer_finetune"]["resumed_from_step"] == 2
    assert json.loads(stamp.read_text())["done"] is True


def test_nopt_trains_the_tokenizer_on_the_target_and_the_t5_from_scratch(env):
    """tools/reproduce.py --methods utgrec-nopt: the alias drops the --pretrain domains."""
    from megarec.config import load_config
    from megarec.methods.training import TrainRecConfig

    rep = load_tool("reproduce")
    p = env["paths"]
    names = {str(p[n].resolve()): n for n in ("A", "T")}
    over = rep.pretrain_overrides("utgrec", names, str(p["T"]))
    assert over == [("utgrec.pretrain_paths", str(p["A"].resolve()))]    # the target is left out
    assert rep.pretrain_overrides("tiger", names, str(p["T"])) == []
    out, js = env["root"] / "rep", env["root"] / "rep.json"
    assert rep.main(["--data", str(p["T"]), "--pretrain", str(p["A"]), str(p["B"]), "--methods", "utgrec-nopt",
                     "--profile", "tiny", "--out", str(out), "--json", str(js), "--no_progress"]) == 0
    (row,) = json.loads(js.read_text())["results"]
    assert row["method"] == "utgrec-nopt" and row["dataset"] == "T"
    run = out / "tiny" / "T" / "utgrec-nopt" / "seed2024"
    assert (run / "tokenizer" / "codes.safetensors").is_file()
    assert not (run / "rec_pretrain").exists() and not (run / "tokenizer_pretrain").exists()
    codes = _codes(run / "tokenizer" / "codes.safetensors")
    assert len({tuple(r) for r in codes.codes.tolist()}) == len(codes.item_keys) == 20
    cfg = load_config(TrainRecConfig, run / "rec" / "config.yaml")
    assert cfg.train.init_from == "" and cfg.utgrec.pretrain_paths == []


def test_stage_command_finetunes_from_given_files(env, pipeline, capsys):
    """`train_rec.py --method utgrec --data.codes ... --init_from ...`: the last stage as its own command."""
    from megarec.train_rec import main

    out, _ = pipeline
    run_dir = env["root"] / "cmd"
    assert main(["--method", "utgrec", "--profile", "tiny", "--data.paths", str(env["paths"]["T"]),
                 "--data.codes", str(out / "tokenizer_finetune" / "codes.safetensors"),
                 "--init_from", str(out / "rec_pretrain"), "--train.run_dir", str(run_dir),
                 "--train.progress", "false", "--train.epochs", "1"]) == 0
    assert "test" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (run_dir / "model" / "codes.safetensors").is_file()


def test_bad_settings_are_clear_errors(env, tmp_path):
    from megarec.config import ConfigError
    from megarec.train_rec import main
    from megarec.methods.training import run_pipeline

    with pytest.raises(ConfigError, match="also the target"):
        run_pipeline("utgrec", [env["paths"]["T"]], tmp_path / "x", profile="tiny", progress=False,
                     overrides=[("utgrec.pretrain_paths", str(env["paths"]["T"]))])
    assert main(["--method", "utgrec", "--profile", "tiny", "--data.paths", str(env["paths"]["T"]),
                 "--train.run_dir", str(tmp_path / "y")]) == 2
    with pytest.raises(ConfigError, match="stages.shards"):
        run_pipeline("utgrec", [env["paths"]["T"]], tmp_path / "z", profile="tiny", progress=False,
                     stage_overrides={"shards": [("image", "none")]})


def test_every_profile_stage_is_a_valid_config(env, tmp_path):
    """The tokenizer stages of every utgrec profile validate as train_tokenizer.py configs (pre-training and
    fine-tuning), the T5 pre-training keys as a train_rec.py config; the paper settings are the paper's."""
    from megarec.methods.profiles import STANDARD, flatten, load_profile
    from megarec.methods.utgrec.stages import rec_pretrain_config, tokenizer_config
    from megarec.methods.training import pipeline_config

    for profile in STANDARD:
        stages = {k: flatten(v) for k, v in load_profile("utgrec", profile).stages.items()}
        assert set(stages) <= {"shards", "tokenizer", "tokenizer_finetune", "rec_pretrain"}, profile
        cfg = pipeline_config("utgrec", [env["paths"]["T"]], tmp_path, profile, progress=False)
        pre = tokenizer_config(cfg, tmp_path, tmp_path / "tok", stages["tokenizer"])
        ft = tokenizer_config(cfg, tmp_path, tmp_path / "ft", stages["tokenizer"] + stages["tokenizer_finetune"],
                              [("train.init_from", str(tmp_path)), ("train.finetune", "true")])
        rec = rec_pretrain_config(cfg, [str(env["paths"]["A"])], tmp_path / "c", tmp_path / "r",
                                  stages["rec_pretrain"])
        assert rec.utgrec.pretrain_paths == [] and rec.tiger == cfg.tiger
        if profile == "paper":   # Sec. 3.1.4
            assert (pre.utgrec.encoder.backend, pre.utgrec.codebook.root_size, pre.utgrec.codebook.leaf_size,
                    pre.utgrec.codebook.levels) == ("qwen2vl", 256, 512, 3)
            assert (pre.train.lr, pre.train.epochs, ft.train.lr, ft.train.epochs) == (3e-4, 3, 1e-4, 20)
            assert (rec.train.lr, rec.train.epochs, cfg.train.lr) == (5e-3, 50, 3e-3)
        else:
            assert pre.utgrec.encoder.backend == "text"


def test_seeds_share_one_pretraining_and_the_pretrain_users_are_capped(env, monkeypatch):
    """tools/reproduce.py with two seeds: tokenizer and T5 are pre-trained once (first seed, in
    OUT/PROFILE/pretrain/utgrec/A+B, on ``utgrec.pretrain_max_users`` users of each domain); each seed
    fine-tunes both on the target with its own seed."""
    import megarec.methods.training
    import megarec.methods.utgrec.tokenizer_run
    from megarec.config import load_config
    from megarec.methods.training import TrainRecConfig

    calls: dict[str, list[str]] = {"tok": [], "rec": []}
    for mod, key in ((megarec.methods.utgrec.tokenizer_run, "tok"), (megarec.methods.training, "rec")):
        real = mod.run
        monkeypatch.setattr(mod, "run", lambda c, real=real, key=key: calls[key].append(c.train.run_dir) or real(c))
    p, out = env["paths"], env["root"] / "shared"
    assert load_tool("reproduce").main(
        ["--data", str(p["T"]), "--pretrain", str(p["B"]), str(p["A"]), "--methods", "utgrec", "--profile", "tiny",
         "--seeds", "7,8", "--out", str(out), "--no_progress", "--set", "utgrec.pretrain_max_users", "20"]) == 0
    pre = out / "tiny" / "pretrain" / "utgrec" / "A+B"
    assert [Path(d).name for d in calls["tok"]] == ["tokenizer_pretrain", "tokenizer_finetune", "tokenizer_finetune"]
    assert [Path(d).parent.name for d in calls["rec"]] == ["A+B", "seed7", "seed8"]   # rec_pretrain, rec, rec
    assert len(_codes(pre / "tokenizer_pretrain" / "codes.safetensors").item_keys) <= 40
    settings = json.loads((pre / "rec_pretrain" / "stage.json").read_text())["settings"]["rec"]
    assert settings["train"]["seed"] == 7 and settings["data"]["max_users"] == 20
    for seed in (7, 8):
        run = out / "tiny" / "T" / "utgrec" / f"seed{seed}"
        assert not (run / "tokenizer_pretrain").exists() and not (run / "rec_pretrain").exists()
        ft = json.loads((run / "tokenizer_finetune" / "stage.json").read_text())["settings"]["tokenizer"]
        assert ft["train"]["seed"] == seed
        cfg = load_config(TrainRecConfig, run / "rec" / "config.yaml")
        assert cfg.train.init_from == str((pre / "rec_pretrain" / "model").resolve()) and cfg.train.seed == seed
    from megarec.methods.training import read_domains
    pre_cfg = load_config(TrainRecConfig, pre / "rec_pretrain" / "config.yaml")
    assert [len(d.users) for d in read_domains(pre_cfg.data)] == [20, 20]   # of 30 each
    calls["tok"].clear(), calls["rec"].clear()   # another seed in its own process reuses that pre-training
    assert load_tool("reproduce").main(
        ["--data", str(p["T"]), "--pretrain", str(p["B"]), str(p["A"]), "--methods", "utgrec", "--profile", "tiny",
         "--seeds", "9", "--pretrain_seed", "7", "--out", str(out), "--no_progress",
         "--set", "utgrec.pretrain_max_users", "20"]) == 0
    assert [Path(d).name for d in calls["tok"]] == ["tokenizer_finetune"]
    assert [Path(d).parent.name for d in calls["rec"]] == ["seed9"]


def test_runs_sharing_a_stage_folder_take_turns(tmp_path):
    """Two runs reaching one shared stage at once: the second waits for the first and reuses its result."""
    import threading
    import time

    from megarec.methods.utgrec.stages import run_stage

    done, results = [], []

    def work(_: bool) -> dict:
        done.append(1)
        time.sleep(0.5)
        return {"value": len(done)}

    threads = [threading.Thread(target=lambda: results.append(run_stage(tmp_path / "stage", {"k": 1}, work)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 1
    assert sorted(r["reused"] for r in results) == [False, True] and {r["value"] for r in results} == {1}
