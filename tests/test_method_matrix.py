"""Every registered method x every embedded sample domain, end to end with the ``tiny`` profile: the
pipeline's stages, training, the test metrics, then the trained model loaded back as ``megarec
recommend`` loads it.

Shared to save time: one module folder; per domain, one SASRec teacher for the methods that distil one
(ETEGRec, UniGRec), trained by their own teacher stage; UTGRec pre-trains on every other sample domain
(as ``megarec quickstart`` does) in a pre-training folder per set of domains, as tools/reproduce.py does
(the three targets have three different sets, so no pre-training is shared between them here).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from megarec.data.sample import sample_paths
from megarec.methods import get_method, method_names

PROFILE = "tiny"
PRETRAIN_SEED = 2024
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
SLOW = {"utgrec"}            # about 20 s per domain on a 2-core machine; the others take seconds
PATHS = {p.name: p for p in sample_paths()}
# methods that distil a SASRec teacher (joint plug-ins name its key): the run-config key of its item embeddings
TEACHER_KEYS = {m: f"{get_method(m).config_section}.{get_method(m).teacher_key}" for m in method_names()
                if getattr(get_method(m), "teacher_key", "")}

CASES = [pytest.param(m, d, id=f"{m}-{d}", marks=[pytest.mark.slow] if m in SLOW else [])
         for m in method_names() for d in PATHS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def teachers(root):
    """``teacher(domain)``: the item embeddings of the tiny SASRec teacher of ``domain``, made once by the
    plug-ins' teacher stage (ETEGRec's and UniGRec's tiny profiles ask for the same teacher)."""
    from megarec.methods.joint.stages import teacher_embeddings
    from megarec.methods.profiles import flatten, load_profile
    from megarec.methods.training import pipeline_config

    made: dict[str, Path] = {}
    settings = {m: flatten(load_profile(m, PROFILE).stages.get("teacher", {})) for m in TEACHER_KEYS}
    assert len({tuple(s) for s in settings.values()}) == 1, f"the tiny profiles ask for different teachers: {settings}"

    def teacher(domain: str) -> Path:
        if domain not in made:
            cfg = pipeline_config("etegrec", [PATHS[domain]], root / domain, PROFILE, progress=False)
            made[domain], _ = teacher_embeddings(cfg, root / domain / "teacher", settings["etegrec"], progress=False)
        return made[domain]

    return teacher


def overrides(method: str, domain: str, root: Path, teachers) -> list[tuple[str, str]]:
    """The pre-training domains of a transferring method (every other sample domain, in a pre-training
    folder per set of domains) and the shared teacher of a distilling one."""
    from megarec.quickstart import transfer_overrides

    over = transfer_overrides(method, domain, PATHS)
    plugin = get_method(method)
    if over and getattr(plugin, "pretrain_dir_key", None):
        others = "+".join(sorted(n for n in PATHS if n != domain))
        over += [(plugin.pretrain_dir_key, str(root / "pretrain" / method / others)),
                 (plugin.pretrain_seed_key, str(PRETRAIN_SEED))]
    if method in TEACHER_KEYS:
        over.append((TEACHER_KEYS[method], str(teachers(domain))))
    return over


@pytest.mark.parametrize("method,domain", CASES)
def test_method_trains_tests_and_recommends_on_sample_domain(method, domain, root, teachers):
    from megarec.data.readers import read_domain
    from megarec.methods.training import load_trained, run_pipeline

    out = root / domain / method
    res = run_pipeline(method, [PATHS[domain]], out, profile=PROFILE,
                       overrides=overrides(method, domain, root, teachers), progress=False)
    test = res["test"]
    for k in METRICS:
        assert isinstance(test[k], float) and math.isfinite(test[k]) and 0.0 <= test[k] <= 1.0, (k, test[k])
    assert test["ndcg@10"] <= test["recall@10"] and test["recall@5"] <= test["recall@10"]
    data = read_domain(PATHS[domain])
    assert test["count"] == len(data.sequences) > 0

    trained = load_trained(out / "rec")                   # as `megarec recommend --model RUN` does
    assert [d.name for d in trained.domains] == [domain]
    n_items = trained.domains[0].num_items
    assert n_items == data.num_items
    histories = [np.asarray(s, dtype=np.int64) for s in data.sequences[:8]]
    items, scores = trained.recommender.recommend(histories, 10)
    items = np.asarray(items.cpu())
    assert items.shape == (len(histories), 10) and tuple(scores.shape) == items.shape
    assert ((items == -1) | ((items >= 0) & (items < n_items))).all(), items
    for row in items:
        found = row[row >= 0]
        assert len(found) > 0 and len(set(found.tolist())) == len(found), row


def test_tiny_collision_levels_hold_the_whole_sample():
    """A fixed-size dedup level of a tiny profile holds the largest group of identical IDs the tiny RQ-VAE
    can make on the sample: up to every item of every sample domain in one code space."""
    from megarec.config import load_config
    from megarec.data.sample import load_sample
    from megarec.methods.training import TrainRecConfig, profile_layer

    total = sum(d.num_items for d in load_sample())
    checked = []
    for method in method_names():
        cfg = load_config(TrainRecConfig, None, [("method", method)], base=[profile_layer(method, PROFILE)])
        section = get_method(method).section(cfg)
        if getattr(section, "collisions", None) == "dedup" and hasattr(section, "collision_codes"):
            assert section.collision_codes >= total, (method, section.collision_codes, total)
            checked.append(method)
    assert {"etegrec", "unigrec"} <= set(checked)
