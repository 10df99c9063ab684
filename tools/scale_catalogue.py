"""The catalogue part of ``tools/bench_scale.py``: a UTGRec-pre-training-size catalogue through every
host-side stage of the generative-recommendation pipeline, timed and memory-metered stage by stage.

A synthetic raw Amazon Reviews 2023 set (``<Cat>.jsonl`` reviews + ``meta_<Cat>.jsonl``, the reader's
real format) is written first: ``users`` users of at least 5 interactions (mean ``interactions / users``)
over ``items`` items with a long-tailed popularity, every item with at least 5, plus noise users and
items below 5 interactions that 5-core filtering must remove. Then, in this one process (a user's
pipeline runs them in one process too):

    read_5core      megarec.data.readers.read_domain(..., kcore=5)     (JSON parsing, 5-core, sequences)
    split           leave_one_out                                      (train / valid / test samples)
    embeddings      item vectors for the RQ-VAE: synthetic, clustered 384-d (all-MiniLM-L6-v2's width);
                    the text encoder's own rate is measured on a sample and extrapolated (reported apart)
    rqvae           train_rqvae, a fixed number of epochs (3 x 256 codes)
    assign_dedup    codes + TIGER's dedup level                        (assign_catalogue, policy dedup)
    assign_utgrec   codes + UTGRec's collision resolution              (policy utgrec)
    code_sequences  CodeSequenceData: tokenised histories / labels of every split
    trie            ItemTrie over the catalogue's codes
    t5_train        TIGER's paper-size T5 (``configs/tiger/paper.yaml``), fixed steps of batch 256
    beam_eval       trie-constrained beam search (beam 20) + Recall/NDCG on a 10k-user test sample
    full_rank_eval  SASRec full ranking (every item scored) + Recall/NDCG on the same 10k users

Per stage: seconds and the process's peak resident memory during the stage (sampled every 20 ms
from /proc/self/statm, so it includes what earlier stages still hold, as in a real run).
"""
from __future__ import annotations

import json
import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

PAPER = {"users": 1_000_000, "items": 344_000, "interactions": 8_600_000}   # UTGRec Table 1, pre-training
QUICK = {"users": 150_000, "items": 50_000, "interactions": 1_250_000}
TINY = {"users": 3_000, "items": 1_000, "interactions": 25_000}          # the test that guards the script
CATEGORY = "Synthetic"
WORDS = ("nail lacquer shimmer polish matte gloss brush cream serum mask lotion oil balm scrub powder glow "
         "rose lavender vanilla citrus mint aloe argan coconut shea organic vegan travel mini deluxe set "
         "kit pack bottle tube jar pump spray stick pencil liner palette compact refill ounce fluid").split()
CATS = ("Beauty", "Skin Care", "Hair Care", "Makeup", "Nails", "Fragrance", "Tools", "Bath", "Men", "Sets")


# --------------------------------------------------------------------------- memory meter
class RSSMeter:
    """Peak resident set size of this process while a stage runs (a sampling thread)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.page = every_s, os.sysconf("SC_PAGE_SIZE")
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def reset(self) -> None:
        self.peak = self.rss()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stage(name: str, results: dict[str, Any], meter: RSSMeter, **extra: Any) -> Iterator[dict[str, Any]]:
    meter.reset()
    t0 = time.perf_counter()
    info: dict[str, Any] = dict(extra)
    yield info
    info["s"] = round(time.perf_counter() - t0, 2)
    info["gb"] = round(max(meter.peak, meter.rss()) / 2**30, 3)
    results[name] = info
    print(f"  {name:<15} {info['s']:>8.1f} s {info['gb']:>7.2f} GB  "
          + " ".join(f"{k}={v}" for k, v in info.items() if k not in ("s", "gb")), flush=True)


# --------------------------------------------------------------------------- synthetic raw data
def write_raw(out: Path, users: int, items: int, interactions: int, seed: int = 0) -> dict[str, int]:
    """Reviews + meta JSONL of the Amazon 2023 layout. Core users / items all have >= 5 interactions;
    10% extra noise users (1-3 interactions) and 5% noise items (1-3) are what 5-core removes."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    # core: every item 5 slots, the rest by a Zipf-like popularity (the long tail of Amazon catalogues)
    extra = max(interactions - 5 * items, 0)
    pop = (np.arange(items) + 20.0) ** -0.9
    slots = np.concatenate([np.repeat(np.arange(items), 5), rng.choice(items, extra, p=pop / pop.sum())])
    rng.shuffle(slots)
    lengths = 5 + rng.multinomial(len(slots) - 5 * users, np.full(users, 1.0 / users))   # every user >= 5
    n_noise_items = items // 20
    noise_users = users // 10
    noise_len = rng.integers(1, 4, noise_users)
    noise_items = items + rng.integers(0, n_noise_items, int(noise_len.sum()))
    t0 = 1_500_000_000_000
    rows = 0
    with open(out / f"{CATEGORY}.jsonl", "w") as f:
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for u in range(users):
            seq = slots[starts[u]:starts[u + 1]]
            ts = t0 + np.cumsum(rng.integers(1, 10**8, len(seq)))
            f.write("".join(f'{{"rating": 5.0, "title": "ok", "text": "fine", "images": [], "asin": "B{i:09d}", '
                            f'"parent_asin": "P{i:09d}", "user_id": "U{u:08d}", "timestamp": {t}, '
                            f'"helpful_vote": 0, "verified_purchase": true}}\n' for i, t in zip(seq.tolist(), ts.tolist())))
            rows += len(seq)
        pos = 0
        for u, n in enumerate(noise_len.tolist()):
            seq = noise_items[pos:pos + n]
            pos += n
            f.write("".join(f'{{"rating": 4.0, "asin": "B{i:09d}", "parent_asin": "P{i:09d}", '
                            f'"user_id": "N{u:08d}", "timestamp": {t0 + k}}}\n' for k, i in enumerate(seq.tolist())))
            rows += n
    words = np.array(WORDS)
    with open(out / f"meta_{CATEGORY}.jsonl", "w") as f:
        for i in range(items + n_noise_items):
            w = words[rng.integers(0, len(words), 12)]
            meta = {"main_category": "All Beauty", "title": " ".join(w[:6]), "features": [" ".join(w[6:])],
                    "description": [], "categories": ["Beauty", CATS[i % len(CATS)]], "store": f"S{i % 997}",
                    "images": [{"large": f"https://example.invalid/{i}.jpg", "variant": "MAIN"}],
                    "parent_asin": f"P{i:09d}"}
            f.write(json.dumps(meta) + "\n")
    return {"raw_rows": rows, "raw_users": users + noise_users, "raw_items": items + n_noise_items}


def clustered_embeddings(n: int, dim: int = 384, clusters: int = 2000, seed: int = 0) -> torch.Tensor:
    """Unit vectors around ``clusters`` random centres (a stand-in for sentence embeddings of item text)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    which = torch.randint(0, clusters, (n,), generator=g)
    x = centres[which] + 0.8 * torch.randn(n, dim, generator=g) / dim ** 0.5   # items of a cluster differ
    return torch.nn.functional.normalize(x, dim=1)


# --------------------------------------------------------------------------- the stages
def run(work: Path, sizes: dict[str, int], *, rqvae_epochs: int = 2, t5_steps: int = 10, eval_users: int = 10_000,
        eval_batch: int = 256, text_sample: int = 512, seed: int = 0) -> dict[str, Any]:
    """Every stage on a catalogue of ``sizes``; returns ``{stage: {s, gb, ...}}`` plus totals."""
    from megarec.config import TokenizerConfig, load_config
    from megarec.data.code_sequences import CodeSequenceData
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.methods.evaluation import evaluate_beam
    from megarec.methods.profiles import flatten, load_profile
    from megarec.recommender.metrics import RankingMetrics
    from megarec.recommender.sasrec import SASRec, SASRecConfig, pad_histories
    from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
    from megarec.recommender.trie import ItemTrie
    from megarec.tokenizer.assign import CollisionError, assign_catalogue
    from megarec.tokenizer.encoders import item_keys
    from megarec.tokenizer.train import train_rqvae

    torch.manual_seed(seed)
    results: dict[str, Any] = {}
    meter = RSSMeter()
    raw = work / "raw"
    try:
        with stage("generate", results, meter) as info:
            info.update(write_raw(raw, **sizes, seed=seed))
        with stage("read_5core", results, meter) as info:
            domain = read_domain(raw, kcore=5)
            info.update(users=len(domain.users), items=domain.num_items,
                        interactions=int(sum(len(s) for s in domain.sequences)))
        with stage("split", results, meter) as info:
            split = leave_one_out(domain, max_len=20)
            info.update(train=len(split.train.targets), valid=len(split.valid.targets), test=len(split.test.targets))
        del split
        with stage("embeddings", results, meter) as info:
            x = clustered_embeddings(domain.num_items, seed=seed)
            info.update(dim=x.shape[1], text_encoder_items_per_s=_text_encoder_rate(domain, text_sample))
            info["text_encoder_s_extrapolated"] = round(domain.num_items / info["text_encoder_items_per_s"], 1)
        cfg = load_config(TokenizerConfig, None, [("epochs", rqvae_epochs), ("eval_every", rqvae_epochs),
                                                  ("seed", seed), ("device", "cpu")])
        with stage("rqvae", results, meter, epochs=rqvae_epochs) as info:
            rq, _ = train_rqvae(x, cfg, progress=False)
        results["rqvae"]["s_per_epoch"] = round(results["rqvae"]["s"] / rqvae_epochs, 2)
        keys = item_keys(domain)
        with torch.no_grad():
            with stage("assign_dedup", results, meter) as info:
                codes = assign_catalogue(rq, x, keys, "dedup")
                info.update(collisions_before=round(codes.stats["collision_rate_before"], 4),
                            dedup_size=int(codes.codebook_sizes[-1]))
            with stage("assign_utgrec", results, meter) as info:
                try:
                    ucodes = assign_catalogue(rq, x, keys, "utgrec")
                    info.update(collisions_after=round(ucodes.stats["collision_rate_after"], 6))
                except CollisionError as e:   # a prefix group larger than the last codebook: reported as is
                    info["error"] = str(e).split(";")[0]
        del x
        with stage("code_sequences", results, meter) as info:
            data = CodeSequenceData([domain], codes)
            info.update(train_rows=len(data.train), tokens=int(data.train.lengths.sum()))
        with stage("trie", results, meter) as info:
            trie = ItemTrie(data.item_tokens, data.vocab.num_levels, data.vocab)
            info["levels"] = data.vocab.num_levels
        t5cfg = load_config(T5RecConfig, None, [(k.split(".", 1)[1], v) for k, v in flatten(load_profile("tiger", "paper").rec)
                                                  if k.startswith("tiger.")])
        model = GenerativeRecommender(t5cfg, data.vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(seed)
        with stage("t5_train", results, meter, steps=t5_steps, batch=256,
                   params=sum(p.numel() for p in model.parameters())) as info:
            times = []
            for _ in range(t5_steps):
                t = time.perf_counter()
                b = data.train.batch(rng.integers(0, len(data.train), 256))
                loss = model(b["input_ids"], b["attention_mask"], b["labels"]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
            info["s_per_step_median"] = round(float(np.median(times)), 3)
            info["epoch_s_extrapolated"] = round(info["s_per_step_median"] * len(data.train) / 256, 0)
        sample = _user_sample(data.test[0], eval_users, seed)
        with stage("beam_eval", results, meter, users=len(sample), beam=20) as info:
            metrics = evaluate_beam(model, [trie], [0], [sample], data.domain_names, 20, eval_batch, "cpu")
            info["ndcg@10"] = round(metrics["ndcg@10"], 5)
        del model, opt
        with stage("full_rank_eval", results, meter, users=len(sample)) as info:
            sas = SASRec(domain.num_items, SASRecConfig()).eval()
            test = data.splits[0].test
            idx = sample.rows
            met = RankingMetrics((5, 10))
            with torch.no_grad():
                for s in range(0, len(idx), eval_batch):
                    rows = idx[s:s + eval_batch]
                    hist = pad_histories([test.histories[i] for i in rows], 20)
                    top = sas.scores(hist).topk(10, dim=1).indices
                    met.update(top, torch.as_tensor(np.asarray(test.targets)[rows]))
            info["ndcg@10"] = round(met.compute()["ndcg@10"], 5)
    finally:
        meter.close()
    results["catalogue"] = {"items": results["read_5core"]["items"], "users": results["read_5core"]["users"],
                            "interactions": results["read_5core"]["interactions"],
                            "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    return results


class _Rows:
    """A row subset of CodeSamples (``len`` / ``batch``) for evaluate_domains; ``rows`` are the chosen rows."""

    def __init__(self, samples, rows: np.ndarray) -> None:
        self.samples, self.rows = samples, rows
        self.lengths = samples.lengths[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices, device):
        return self.samples.batch(self.rows[np.asarray(indices)], device)


def _user_sample(samples, n: int, seed: int) -> _Rows:
    rows = np.sort(np.random.default_rng(seed).permutation(len(samples))[:n])
    return _Rows(samples, rows)


def _text_encoder_rate(domain, n: int) -> float:
    """Items/s of the bundled all-MiniLM-L6-v2 on ``n`` item texts (the real encoder, this machine)."""
    from megarec.tokenizer.encoders import encode_texts

    texts = [domain.text(i) for i in range(min(n, domain.num_items))]
    encode_texts(texts[:32], progress=False)   # load + warm up
    t = time.perf_counter()
    encode_texts(texts, progress=False)
    return round(len(texts) / (time.perf_counter() - t), 1)
