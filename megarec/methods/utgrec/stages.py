"""UTGRec's transfer pipeline (Sec. 2.4), stage by stage; see :mod:`megarec.methods.utgrec.plugin`.

Each stage writes its own folder under the pipeline's ``out_dir`` with a ``stage.json``
(settings fingerprint, result); a rerun skips a finished stage made with the same settings,
resumes an unfinished one from its checkpoints, and redoes one whose settings changed.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from megarec.config import ConfigError, load_config, override_value, to_dict
from megarec.data.codes import CodesFile
from megarec.data.domain import Domain
from megarec.distributed import get_logger

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig

STAMP = "stage.json"
STAMP_FORMAT = "megarec-utgrec-stage/1"
CODES = "codes.safetensors"

# Tokenizer settings the pipeline uses unless the profile's stages say otherwise: the CPU text
# backend (bundled all-MiniLM-L6-v2) and no image decoder.
TOKENIZER_DEFAULTS: dict[str, Any] = {"utgrec": {"encoder": {"backend": "text"}}}


# --------------------------------------------------------------------------- stage bookkeeping
def domain_fingerprint(d: Domain) -> dict[str, Any]:
    """Name, size and a SHA-256 of the item ids, item texts and interaction sequences of ``d``."""
    h = hashlib.sha256()
    h.update(json.dumps([str(i) for i in d.item_ids]).encode())
    h.update(json.dumps(d.item_text, sort_keys=True, default=str).encode())
    for s in d.sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes() + b"|")
    return {"name": d.name, "items": d.num_items, "users": len(d.sequences), "sha256": h.hexdigest()}


def fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(folder: Path, settings: dict[str, Any], work: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work(resume)`` in ``folder`` unless ``folder/stage.json`` says it finished with ``settings``.

    A finished stage with the same settings is skipped (its recorded result is returned with
    ``"reused": True``); an unfinished one with the same settings is continued (``resume=True``:
    the trainers load their latest checkpoint, if any); a folder made with other settings is
    deleted and the stage redone. Runs sharing a folder (``utgrec.pretrain_dir``) take turns: the
    stage holds an exclusive lock (``<folder>.lock``) while it checks and runs, so a second run waits
    and then reuses the first one's result. Returns the stage's result (JSON-serialisable)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also if this process dies
        return _run_stage_locked(folder, settings, work)


def _run_stage_locked(folder: Path, settings: dict[str, Any], work: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    log = get_logger("megarec.utgrec")
    fp = fingerprint(settings)
    stamp = folder / STAMP
    old: dict[str, Any] = {}
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            old = {}
    same = old.get("fingerprint") == fp
    if same and old.get("done"):
        log.info("stage %s: reusing (same settings)", folder.name)
        return {**old["result"], "reused": True}
    if folder.exists() and not same:
        log.info("stage %s: %s; starting it again", folder.name,
                 "settings changed" if old else "no finished run recorded")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": STAMP_FORMAT, "fingerprint": fp, "settings": settings, "done": False}
    stamp.write_text(json.dumps(record, indent=2, default=str))
    result = json.loads(json.dumps(work(same), default=str))
    stamp.write_text(json.dumps({**record, "done": True, "result": result}, indent=2, default=str))
    return {**result, "reused": False}


# --------------------------------------------------------------------------- stages
def build_shards(domains: Sequence[Domain], folder: Path, settings: Sequence[tuple[str, Any]], max_len: int,
                 progress: bool) -> tuple[Path, dict[str, Any]]:
    """Stage ``shards``: item shards of ``domains`` (``stages.shards`` keys: ``images`` none|placeholder|files,
    ``max_count``); reused when made from the same data and settings."""
    from megarec.data.shards import write_shards

    opts = {"images": "none", "max_count": 10000, **dict(settings)}
    unknown = sorted(set(opts) - {"images", "max_count"})
    if unknown:
        raise ConfigError(f"stages.shards: unknown keys {unknown}; valid keys: images, max_count")
    for d in domains:
        d.require_text("utgrec")
    spec = {"shards": opts, "max_len": max_len, "domains": [domain_fingerprint(d) for d in domains],
            "layout": "domains-interleaved"}   # write_shards' item order (shards of older layouts are rebuilt)

    def work(_: bool) -> dict[str, Any]:
        paths = write_shards(list(domains), folder, max_count=int(opts["max_count"]), images=str(opts["images"]),
                             max_len=max_len, overwrite=True, progress=progress)
        return {"shards": len(paths), "items": sum(d.num_items for d in domains)}

    return folder, {**run_stage(folder, spec, work), "fingerprint": fingerprint(spec)}


def tokenizer_config(cfg: "TrainRecConfig", shards: Path, run_dir: Path, settings: Sequence[tuple[str, Any]],
                     forced: Sequence[tuple[str, str]] = (), seed: int | None = None) -> Any:
    """A ``train_tokenizer.py`` config: :data:`TOKENIZER_DEFAULTS` < the run's seed (or ``seed``) / threads /
    text fields < ``settings`` (a profile's ``stages.tokenizer`` keys, CLI strings or YAML values) < ``forced``."""
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    seed = cfg.train.seed if seed is None else seed
    base = [("train.seed", str(seed)), ("train.cpu_threads", str(cfg.train.cpu_threads)),
            ("train.progress", str(cfg.train.progress))]
    if cfg.data.text_fields:
        base.append(("data.text_fields", override_value(cfg.data.text_fields)))
    over = base + [(k, override_value(v)) for k, v in settings] + [("data.shards", str(shards)),
                                                            ("train.run_dir", str(run_dir)), *forced]
    return load_config(TrainTokenizerConfig, None, over, base=[("utgrec pipeline defaults", TOKENIZER_DEFAULTS)])


def _tokenizer_settings(tok_cfg: Any, upstream: Sequence[str]) -> dict[str, Any]:
    d = to_dict(tok_cfg)
    for k in ("run_dir", "progress", "cpu_threads", "resume", "dist_timeout_s"):
        d["train"].pop(k, None)
    d["data"].pop("shards", None)
    d["train"].pop("init_from", None)   # the upstream fingerprints stand for the files
    return {"tokenizer": d, "upstream": list(upstream)}


def train_tokenizer_stage(tok_cfg: Any, upstream: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """Train (or fine-tune) the UTGRec tokenizer of ``tok_cfg`` and export its codes; returns the run folder
    and a summary (steps, time, held-out collision rate, codes statistics)."""
    from megarec.methods.utgrec.tokenizer_run import run

    folder = Path(tok_cfg.train.run_dir)
    spec = _tokenizer_settings(tok_cfg, upstream)

    def work(resume: bool) -> dict[str, Any]:
        from megarec.tokenizer.assign import CollisionError

        tok_cfg.train.resume = resume
        try:
            res = run(tok_cfg)
        except CollisionError as e:   # the trained weights stay in the folder; a rerun resumes at the export
            raise CollisionError(f"utgrec pipeline, stage {folder.name} ({folder}): {e} (stages.tokenizer "
                                 "utgrec.codebook.leaf_size / levels, or a longer training)") from e
        return {"run_dir": str(folder), "global_step": res["global_step"], "train_s": res["train_s"],
                "resumed_from_step": res.get("resumed_from_step"),
                "heldout_collision_rate": res["heldout_collision_rate"], "codes": res.get("codes")}

    result = run_stage(folder, spec, work)
    if not (folder / CODES).is_file():
        raise ConfigError(f"{folder}: the tokenizer stage wrote no {CODES} (export.codes must stay true)")
    return folder, {**result, "fingerprint": fingerprint(spec)}


def rec_pretrain_config(cfg: "TrainRecConfig", paths: Sequence[str], codes: Path, run_dir: Path,
                        settings: Sequence[tuple[str, Any]]) -> Any:
    """The T5 pre-training run: the target run's config on the pre-training domains (``utgrec.pretrain_max_users``
    of each) and their codes, with the pre-training seed and no pre-training of its own, then the
    ``stages.rec_pretrain`` keys (e.g. ``train.epochs``, ``train.lr``). Nothing of the target is left in it,
    so runs on other targets or seeds that share ``utgrec.pretrain_dir`` get the same settings."""
    from megarec.methods.training import TrainRecConfig

    over = [("data.paths", ",".join(paths)), ("data.codes", str(codes)),
            ("data.max_users", str(cfg.utgrec.pretrain_max_users)), ("train.seed", str(pretrain_seed(cfg))),
            ("utgrec.pretrain_paths", ""), ("utgrec.pretrain_dir", ""), ("utgrec.pretrain_seed", "-1"),
            ("utgrec.pretrain_max_users", "0"),
            ("train.init_from", ""), ("train.resume", "false"), ("train.run_dir", str(run_dir))]
    return load_config(TrainRecConfig, None, over + [(k, override_value(v)) for k, v in settings],
                       base=[("the utgrec run config", to_dict(cfg))])


def rec_pretrain_stage(rcfg: Any, upstream: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """Stage ``rec_pretrain``: :func:`megarec.methods.training.run` on the pre-training domains' codes."""
    from megarec.methods.training import run

    folder = Path(rcfg.train.run_dir)
    d = to_dict(rcfg)
    for k in ("run_dir", "progress", "cpu_threads", "resume"):
        d["train"].pop(k, None)
    d["data"].pop("codes", None)
    spec = {"rec": d, "upstream": list(upstream)}

    def work(resume: bool) -> dict[str, Any]:
        rcfg.train.resume = resume
        res = run(rcfg)
        return {"run_dir": str(folder), "test": res.get("test"), "best_epoch": res.get("best_epoch"),
                "epochs_run": res.get("epochs_run"), "train_s": res.get("train_s")}

    return folder, run_stage(folder, spec, work)


def pretrain_seed(cfg: "TrainRecConfig") -> int:
    """The seed of the pre-training stages: ``utgrec.pretrain_seed``, or the run's seed when -1."""
    return cfg.train.seed if cfg.utgrec.pretrain_seed < 0 else cfg.utgrec.pretrain_seed


def _check_domains(pretrain: Sequence[Domain], target: Sequence[Domain]) -> None:
    """No pre-training domain is a target; domain names are distinct (item keys are domain-qualified)."""
    names = [d.name for d in pretrain]
    clash = sorted({d.name for d in target} & set(names))
    if clash:
        raise ConfigError(f"utgrec.pretrain_paths: domain(s) {clash} are also the target (data.paths); "
                          "pre-train on other domains")
    if len(set(names)) != len(names):
        raise ConfigError(f"utgrec.pretrain_paths: domain names repeat ({names}); item keys are "
                          "'<domain>/<item id>', so every domain needs its own name")


def _check_vocab(pre: Path, target: Path) -> None:
    """The pre-trained T5 and the target's codes share one vocabulary (same codebook sizes)."""
    a, b = CodesFile.load(pre).codebook_sizes, CodesFile.load(target).codebook_sizes
    if list(a) != list(b):
        raise ConfigError(f"codebook sizes differ between the pre-training codes {pre} ({list(a)}) and the target's "
                          f"{target} ({list(b)}): the pre-trained T5 cannot be fine-tuned on them")


def utgrec_pipeline(cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path, stages: dict[str, Any],
                    progress: bool = True) -> dict[str, Any]:
    """Stages 1-4 of the module docstring; sets ``cfg.data.codes`` (and, with pre-training,
    ``cfg.train.init_from``). ``stages``: stage name -> ``[(key, value)]`` (a profile's ``stages:``
    flattened): ``shards``, ``tokenizer`` (pre-training, and the from-scratch tokenizer of nopt),
    ``tokenizer_finetune`` (on top of ``tokenizer``), ``rec_pretrain`` (train_rec keys)."""
    from megarec.methods.training import read_domains

    out_dir = Path(out_dir)
    tok_keys = list(stages.get("tokenizer", []))
    paths = [str(Path(p).resolve()) for p in cfg.utgrec.pretrain_paths]
    pretrain = (read_domains(dataclasses.replace(cfg.data, paths=paths, max_users=cfg.utgrec.pretrain_max_users))
                if paths else [])
    _check_domains(pretrain, domains)
    targets = [d.name for d in domains]
    out: dict[str, Any] = {}
    target_shards, out["shards_target"] = build_shards(domains, out_dir / "shards" / "target",
                                                       stages.get("shards", []), cfg.data.max_len, progress)
    if not pretrain:   # utgrec-nopt: the tokenizer on the target only, the T5 from scratch
        tok = tokenizer_config(cfg, target_shards, out_dir / "tokenizer", tok_keys,
                               [("export.domains", ",".join(targets))])
        folder, out["tokenizer"] = train_tokenizer_stage(tok, [out["shards_target"]["fingerprint"]])
        cfg.data.codes = str((folder / CODES).resolve())
        return out
    pre_dir = Path(cfg.utgrec.pretrain_dir).resolve() if cfg.utgrec.pretrain_dir else out_dir
    pre_shards, out["shards_pretrain"] = build_shards(pretrain, pre_dir / "shards" / "pretrain",
                                                      stages.get("shards", []), cfg.data.max_len, progress)
    tok = tokenizer_config(cfg, pre_shards, pre_dir / "tokenizer_pretrain", tok_keys, seed=pretrain_seed(cfg))
    tok_dir, out["tokenizer_pretrain"] = train_tokenizer_stage(tok, [out["shards_pretrain"]["fingerprint"]])
    rcfg = rec_pretrain_config(cfg, paths, (tok_dir / CODES).resolve(), pre_dir / "rec_pretrain",
                               stages.get("rec_pretrain", []))
    rec_dir, out["rec_pretrain"] = rec_pretrain_stage(rcfg, [out["tokenizer_pretrain"]["fingerprint"]])
    ft = tokenizer_config(cfg, target_shards, out_dir / "tokenizer_finetune",
                          tok_keys + list(stages.get("tokenizer_finetune", [])),
                          [("train.init_from", str((tok_dir / "model").resolve())), ("train.finetune", "true"),
                           ("export.domains", ",".join(targets))])
    ft_dir, out["tokenizer_finetune"] = train_tokenizer_stage(
        ft, [out["tokenizer_pretrain"]["fingerprint"], out["shards_target"]["fingerprint"]])
    _check_vocab(tok_dir / CODES, ft_dir / CODES)
    cfg.data.codes = str((ft_dir / CODES).resolve())
    cfg.train.init_from = str((rec_dir / "model").resolve())
    return out
