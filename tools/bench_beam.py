"""Trie-constrained beam search: MegaRec's CSR-trie search vs HF ``generate`` with a Python dict trie.

    python tools/bench_beam.py [--quick] --json FILE

Builds a catalogue of >= 10,000 items with random, unique codes (default 3 levels
x 256), briefly trains a T5 recommender on a synthetic, learnable pattern (so the
logits are peaked, not the near-ties of a random model), then decodes the same
batch of histories with

- ours:  ``megarec.recommender.beam_search.beam_search`` (CSR trie, gathers, KV cache)
- HF:    ``model.t5.generate(num_beams=B, num_return_sequences=B,
         prefix_allowed_tokens_fn=<dict lookup>)``, the way public generative-
         recommendation code constrains decoding (one Python call per beam per step),
         with ``length_penalty=0``, ``early_stopping=True``, ``max_new_tokens=L`` so
         both rank beams by the summed log-probability: the same algorithm.

and checks that both return the same ranked item lists (a swap of two items whose
scores differ by less than ``--tol`` counts as a tie, reported separately).
Prints a markdown table; the JSON has every row and a summary with
``beam_speedup`` (HF time / ours, the smallest over beam sizes) and
``beam_identical``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.formatting import format_table  # noqa: E402
from megarec.data.code_vocab import CodeVocab  # noqa: E402
from megarec.recommender.beam_search import beam_search  # noqa: E402
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig  # noqa: E402
from megarec.recommender.trie import ItemTrie  # noqa: E402


def make_catalogue(num_items: int, levels: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unique random codes plus a learnable successor: next(item) = same codes, level-0 code + 1 (mod k).

    The catalogue is closed under ``next``: it is every level-0 code combined with
    ``num_items / k`` random distinct tails, so each item has a successor and the
    trie looks like a random one (level-0 fan-out k, then random tails).
    """
    n_tails = -(-num_items // k)
    space = k ** (levels - 1)
    if n_tails > space:
        raise SystemExit(f"{num_items} items do not fit in {levels} levels x {k} codes")
    tail_ids = rng.choice(space, n_tails, replace=False)
    tails = np.stack([(tail_ids // k ** j) % k for j in range(levels - 1)], 1)
    codes = np.concatenate([np.repeat(np.arange(k), n_tails)[:, None], np.tile(tails, (k, 1))], 1)
    perm = rng.permutation(len(codes))                     # item index order is random
    codes = codes[perm]
    pos = np.empty(len(codes), dtype=np.int64)
    pos[perm] = np.arange(len(codes))
    # item at original row r = c0 * n_tails + t; its successor is row ((c0 + 1) % k) * n_tails + t
    succ_row = (np.arange(len(codes)) + n_tails) % len(codes)
    successor = pos[succ_row[perm]]
    return codes, successor


def sample_batch(successor: np.ndarray, batch: int, max_items: int, rng: np.random.Generator):
    starts = rng.integers(0, len(successor), batch)
    lengths = rng.integers(1, max_items + 1, batch)
    hists, targets = [], []
    for s, n in zip(starts, lengths):
        h = [int(s)]
        for _ in range(n - 1):
            h.append(int(successor[h[-1]]))
        hists.append(np.asarray(h))
        targets.append(int(successor[h[-1]]))
    return hists, np.asarray(targets)


def train(model: GenerativeRecommender, vocab: CodeVocab, tok: np.ndarray, successor: np.ndarray, steps: int,
          batch: int, max_items: int, rng: np.random.Generator) -> list[float]:
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train", mininterval=5):
        hists, targets = sample_batch(successor, batch, max_items, rng)
        ids, mask = vocab.encode_histories(hists, tok)
        loss = model(ids.to(dev), mask.to(dev), torch.from_numpy(tok[targets]).to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def hf_beam(model: GenerativeRecommender, ids, mask, allowed: dict, pos: dict, beam: int, levels: int):
    """HF generate constrained by a dict trie; returns (items [B, beam], scores [B, beam])."""
    def prefix_allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return allowed.get(tuple(sent.tolist()[1:]), [])

    out = model.t5.generate(input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=beam,
                            max_new_tokens=levels, min_new_tokens=levels, length_penalty=0.0, early_stopping=True,
                            do_sample=False, prefix_allowed_tokens_fn=prefix_allowed, output_scores=True,
                            return_dict_in_generate=True, decoder_start_token_id=model.vocab.PAD,
                            pad_token_id=model.vocab.PAD, eos_token_id=model.vocab.EOS)
    seqs = out.sequences[:, 1:1 + levels].tolist()
    items = torch.tensor([pos.get(tuple(s), -1) for s in seqs]).view(len(ids), beam)
    return items, out.sequences_scores.view(len(ids), beam).float().cpu()


def same_up_to_ties(a_items, a_sc, b_items, b_sc, tol: float) -> tuple[bool, bool]:
    """(exactly equal lists, equal up to ties): scores agree within ``tol`` slot by slot, and
    inside every run of tied scores (consecutive scores closer than ``tol``) both lists hold
    the same items, except in a run that reaches the end of the list (a tie at the cut-off)."""
    exact = bool(torch.equal(a_items, b_items))
    if not torch.allclose(a_sc, b_sc, atol=tol, rtol=0):
        return False, False
    for ra, rb, sa in zip(a_items.tolist(), b_items.tolist(), a_sc.tolist()):
        start = 0
        for i in range(1, len(sa) + 1):
            if i == len(sa) or abs(sa[i] - sa[i - 1]) >= tol:      # run [start, i) ends
                if i < len(sa) and sorted(ra[start:i]) != sorted(rb[start:i]):
                    return exact, False
                start = i
    return exact, True


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()                                                   # warm-up
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer training steps and repeats (about a minute)")
    ap.add_argument("--json", required=True, help="write rows and summary here")
    ap.add_argument("--items", type=int, default=10240, help="catalogue size (>= 10,000 for the report)")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--beams", default="20,50")
    ap.add_argument("--batch", type=int, default=None, help="users decoded at once (default 16 quick, 32 full)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 60 quick, 300 full)")
    ap.add_argument("--max-items", type=int, default=20, help="longest decoded history, in items")
    ap.add_argument("--train-items", type=int, default=None,
                    help="longest training history (default 3 quick, 5 full; the pattern needs only the last item)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: robust on a shared machine; 0 = torch's default)")
    ap.add_argument("--tol", type=float, default=1e-4, help="score tolerance for ties / agreement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.quick else 32)
    steps = args.steps if args.steps is not None else (60 if args.quick else 300)
    train_items = args.train_items or (3 if args.quick else 5)
    train_batch = 32 if args.quick else 64
    repeats = 1 if args.quick else 3
    beams = [int(b) for b in args.beams.split(",")]

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    codes, successor = make_catalogue(args.items, args.levels, args.codebook, rng)
    vocab = CodeVocab([args.codebook] * args.levels)
    tok = vocab.item_tokens(codes)
    model = GenerativeRecommender(T5RecConfig(), vocab).to(args.device)
    t0 = time.perf_counter()
    losses = train(model, vocab, tok, successor, steps, train_batch, train_items, rng)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    trie = ItemTrie(tok, args.levels, vocab).to(args.device)
    trie_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    allowed: dict[tuple, list[int]] = {}
    for row in tok.tolist():
        for level in range(args.levels):
            allowed.setdefault(tuple(row[:level]), set()).add(row[level])
    allowed = {k: sorted(v) for k, v in allowed.items()}
    pos = {tuple(r): i for i, r in enumerate(tok.tolist())}
    dict_build_s = time.perf_counter() - t0

    hists, targets = sample_batch(successor, batch, args.max_items, rng)
    ids, mask = vocab.encode_histories(hists, tok)
    ids, mask = ids.to(args.device), mask.to(args.device)
    rows = []
    with torch.inference_mode():
        for beam in beams:
            ours_s, (o_items, o_sc) = timed(lambda: beam_search(model, ids, mask, trie, beam), repeats)
            o_items, o_sc = o_items.cpu(), o_sc.float().cpu()
            hf_s, (h_items, h_sc) = timed(lambda: hf_beam(model, ids, mask, allowed, pos, beam, args.levels), repeats)
            exact, identical = same_up_to_ties(o_items, o_sc, h_items, h_sc, args.tol)
            rows.append({
                "beam": beam, "users": batch, "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s,
                "identical": identical, "exact_order": exact,
                "max_score_diff": float((o_sc - h_sc).abs().max()),
                "recall@beam": float((o_items == torch.from_numpy(targets)[:, None]).any(1).float().mean()),
            })
    summary = {"beam_speedup": min(r["speedup"] for r in rows), "beam_identical": all(r["identical"] for r in rows)}
    print(f"catalogue {args.items} items, codes {args.levels} x {args.codebook}; trained {steps} steps in "
          f"{train_s:.0f}s (loss {losses[0]:.2f} -> {losses[-1]:.2f}); trie build {trie_build_s * 1e3:.0f} ms, "
          f"dict trie {dict_build_s * 1e3:.0f} ms; torch threads {torch.get_num_threads()}")
    print(format_table(rows, ["beam", "users", "ours_s", "hf_s", "speedup", "identical", "exact_order",
                              "max_score_diff", "recall@beam"]))
    print(json.dumps(summary))
    report = {"summary": summary, "rows": rows, "config": {
        "items": args.items, "levels": args.levels, "codebook": args.codebook, "steps": steps, "train_batch": train_batch,
        "train_history_items": train_items, "users": batch,
        "history_items": args.max_items, "repeats": repeats, "tol": args.tol, "seed": args.seed,
        "model": "T5RecConfig defaults (6+6 layers, d_model 128, d_ff 512, 4 heads)",
        "train_s": train_s, "loss_first": losses[0], "loss_last": losses[-1], "trie_build_s": trie_build_s,
        "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
