"""The joint methods' pipeline stage that a whole training run makes: the SASRec teacher (its item
embeddings are ETEGRec's tokenizer input and UniGRec's distillation target)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from megarec.config import ConfigError, override_value, to_dict


def teacher_embeddings(cfg: Any, out_dir: Path, settings: Sequence[tuple[str, Any]],
                       progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the SASRec teacher on the run's domains and export its item embeddings
    (``out_dir/sasrec_embeddings.safetensors``). ``settings``: the ``teacher`` stage's keys:
    ``profile`` (the SASRec profile, default ``cpu-small``) and any ``train_rec.py`` keys of the
    SASRec run. Reused when ``out_dir`` holds a teacher trained with the same settings; other
    settings there are a ConfigError (the folder is never overwritten)."""
    from megarec.methods.training import load_trained, pipeline_config, run   # the stage is a whole training run
    from megarec.recommender.sasrec import export_item_embeddings
    from megarec.tokenizer.commands import settings_fingerprint

    opts = dict(settings)
    profile = str(opts.pop("profile", "cpu-small"))
    base = [("train.seed", str(cfg.train.seed)), ("data.max_len", str(cfg.data.max_len))]
    if cfg.data.kcore is not None:
        base.append(("data.kcore", str(cfg.data.kcore)))
    if cfg.data.max_users:
        base.append(("data.max_users", str(cfg.data.max_users)))   # the teacher sees the run's users
    tcfg = pipeline_config("sasrec", cfg.data.paths, out_dir, profile,
                           base + [(k, override_value(v)) for k, v in opts.items()], progress)
    fingerprint = settings_fingerprint({k: v for k, v in to_dict(tcfg).items() if k != "train"}
                                       | {"train": {k: v for k, v in to_dict(tcfg)["train"].items()
                                                    if k not in ("run_dir", "progress", "cpu_threads")}})
    path, stamp = out_dir / "sasrec_embeddings.safetensors", out_dir / "teacher_settings.sha256"
    if stamp.is_file():
        if stamp.read_text().strip() != fingerprint:
            raise ConfigError(f"{out_dir} holds a SASRec teacher trained with other settings: delete the folder "
                              "or give the method's teacher embeddings")
        if path.is_file():
            return path, {"reused": str(path)}
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    result = run(tcfg) if not (Path(tcfg.train.run_dir) / "metrics.json").is_file() else {}
    trained = load_trained(tcfg.train.run_dir)
    export_item_embeddings(trained.recommender.ranker.model, trained.item_keys(), path)
    return path, {"test": result.get("test"), "best_epoch": result.get("best_epoch"), "run_dir": tcfg.train.run_dir}
