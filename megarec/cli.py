"""``megarec <command>``: every user-facing step.

Each command is a ``_cmd_<name>(args)`` function plus a ``_add_<name>(sub)``
that declares its arguments; ``COMMANDS`` lists them in the order ``--help``
shows. Heavy imports happen inside the commands so ``megarec --help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from megarec.data.domain import DataError
from megarec.config import ConfigError
from megarec.formatting import format_table


# --------------------------------------------------------------------------- quickstart
def _add_quickstart(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("quickstart", help="everything end to end on the embedded sample, on CPU",
                       description="Statistics, item shards, then SASRec and TIGER (tokenizer -> codes -> T5 -> "
                                   "beam search) trained and tested on each embedded domain; ends with a "
                                   "Recall/NDCG table. TensorBoard logs under --out.")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--methods", default="sasrec,tiger", help="comma-separated methods (default: sasrec,tiger)")
    p.add_argument("--domains", nargs="*", default=None, help="sample domains to use (default: all three)")
    p.add_argument("--profile", default="quickstart", help="training profile (default: quickstart)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from megarec.quickstart import run_quickstart

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_quickstart(args.out, methods=methods, profile=args.profile, domains=args.domains,
                   progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------- stats
def _add_stats(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="per-domain users, items, interactions, avg length, sparsity",
                       description="Print the papers' Table 1 statistics for each domain, as read "
                                   "(k-core filtering only where asked for).")
    p.add_argument("paths", nargs="+", help="domain folders or files (any supported format)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    p.add_argument("--kcore", type=int, default=None,
                   help="apply k-core filtering first (default: none, except 5 for raw Amazon 2023)")
    return p


def _cmd_stats(args: argparse.Namespace) -> int:
    from megarec.data.readers import read_domain

    rows = [read_domain(p, kcore=args.kcore).stats() for p in args.paths]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["domain", "users", "items", "interactions", "avg_len", "sparsity"]))
    return 0


# --------------------------------------------------------------------------- download-images
def _add_download_images(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("download-images", help="fetch item images (raw Amazon 2023 URLs) into a folder",
                       description="Download the image URL of every item of a domain (raw Amazon 2023 meta: the "
                                   "first 'large' image) with retries and exponential backoff. Resumable: files "
                                   "already in OUT are skipped, partial downloads never count as done.")
    p.add_argument("path", help="domain folder or file with image URLs (raw Amazon 2023 with its meta file)")
    p.add_argument("--out", required=True, help="folder for the images (<item id>.jpg)")
    p.add_argument("--workers", type=int, default=8, help="parallel download threads")
    p.add_argument("--retries", type=int, default=4, help="retries per image after a transient error")
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each retry")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--kcore", type=int, default=None, help="k-core filtering (default: the format's)")
    return p


def _cmd_download_images(args: argparse.Namespace) -> int:
    from megarec.data.download_images import download_images
    from megarec.data.readers import read_domain

    domain = read_domain(args.path, kcore=args.kcore)
    report = download_images(domain, args.out, workers=args.workers, retries=args.retries,
                             backoff=args.backoff, timeout=args.timeout)
    print(" ".join(f"{k}={v}" for k, v in report.as_dict().items()))
    for iid, url, err in report.failures[:10]:
        print(f"failed: {iid} {url}: {err}", file=sys.stderr)
    if report.failed:
        print(f"{report.failed} images failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- build-shards
def _add_build_shards(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build-shards", help="write items (metadata, positives, images) as WebDataset tar shards",
                       description="Read one or more domains and write every item as a WebDataset sample "
                                   "(<key>.json metadata with text fields and co-occurrence positives from the "
                                   "leave-one-out training split, plus <key>.jpg/png when there is an image, as on disk "
                                   "or resized to --image-size) into OUT/items-%06d.tar, with a manifest "
                                   "OUT/index.json.")
    p.add_argument("paths", nargs="+", help="domain folders or files (any supported format)")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--max-count", type=int, default=10000, help="items per shard at most")
    p.add_argument("--max-size", type=int, default=1 << 30,
                   help="bytes of member data per shard at most (a shard may exceed it by one item)")
    p.add_argument("--images", choices=("none", "files", "placeholder"), default="none",
                   help="none: no images; files: each item's image file; placeholder: a rendered JPEG per item")
    p.add_argument("--image-dir", default=None,
                   help="with --images files: folder filled by `megarec download-images` (image URLs -> files)")
    p.add_argument("--image-size", type=int, default=None,
                   help="store every image resized to this side (the model's input resolution), re-encoded: "
                        "reading at that size skips the resize; the originals are not kept (default: as is)")
    p.add_argument("--image-format", choices=("jpeg", "png", "webp"), default="jpeg",
                   help="with --image-size: encoding of the stored images")
    p.add_argument("--image-quality", type=int, default=95, help="with --image-size: JPEG/WebP quality (1-100)")
    p.add_argument("--placeholder-size", type=int, default=256, help="with --images placeholder: side in pixels")
    p.add_argument("--max-len", type=int, default=20, help="history length of the leave-one-out split")
    p.add_argument("--kcore", type=int, default=None, help="k-core filtering (default: the format's)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return p


def _cmd_build_shards(args: argparse.Namespace) -> int:
    from megarec.data.readers import read_domain
    from megarec.data.shards import write_shards

    domains = [read_domain(p, kcore=args.kcore) for p in args.paths]
    if args.image_dir:
        from megarec.data.download_images import with_local_images
        domains = [with_local_images(d, args.image_dir) for d in domains]
    paths = write_shards(domains, args.out, max_count=args.max_count, max_size=args.max_size, images=args.images,
                         image_size=args.image_size, image_format=args.image_format, image_quality=args.image_quality,
                         placeholder_size=args.placeholder_size, max_len=args.max_len, overwrite=args.overwrite,
                         progress=True)
    manifest = json.loads((paths[0].parent / "index.json").read_text())
    rows = [{"domain": d.name, "items": d.num_items, "text": d.has_text,
             "images": sum(p is not None for p in d.item_image or []) if args.images == "files"
             else (d.num_items if args.images == "placeholder" else 0)} for d in domains]
    print(format_table(rows, ["domain", "items", "text", "images"]))
    size = sum(s["bytes"] for s in manifest["shards"])
    stored = "" if manifest["image_size"] is None else \
        " (images stored at {}x{})".format(*manifest["image_size"][::-1])  # width x height
    print(f"{manifest['num_items']:,} items in {len(paths)} shards ({size / 2**20:.1f} MiB) under {args.out}{stored}")
    return 0


# --------------------------------------------------------------------------- train-tokenizer
def _add_train_tokenizer(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from megarec.methods.tokenizers import DEFAULT_CLI_TOKENIZER, tokenizer_names

    p = sub.add_parser("train-tokenizer", help="train an RQ-VAE tokenizer on the items of one or more domains; "
                                               "write codes and stats",
                       description="Embed every item (text encoder, or --embeddings for collaborative ones), train "
                                   "an RQ-VAE on the embeddings, then write OUT/model.safetensors + config.yaml, "
                                   "OUT/codes.safetensors (collision policy: --collisions), OUT/stats.json and "
                                   "TensorBoard logs under OUT/tb. Several PATHs: one tokenizer on all their items "
                                   "and one codes file whose IDs are unique over all of them. Any config key can "
                                   "follow the PATHs as --key value, e.g. --epochs 500 --rqvae.codebook_sizes "
                                   "256,256,256 --rqvae.quantizer soft.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="domain folder or file (any supported format); several: one shared code space")
    p.add_argument("--out", required=True, help="output folder for the trained tokenizer")
    p.add_argument("--config", default=None, help="YAML file of TokenizerConfig keys (overrides follow the PATHs)")
    p.add_argument("--embeddings", default=None,
                   help="item embeddings file (megarec-embeddings/1, e.g. SASRec's) instead of item text; "
                        "with several PATHs it holds the items of all of them")
    p.add_argument("--kcore", type=int, default=None, help="k-core filtering (default: the format's)")
    u = p.add_argument_group("--method utgrec (UTGRec universal tokenizer: PATH is the item shard folder of "
                             "`megarec build-shards`, --out the run folder; keys of megarec/train_tokenizer.py)")
    u.add_argument("--method", choices=tokenizer_names(), default=DEFAULT_CLI_TOKENIZER,
                   help="rqvae: RQ-VAE on text / collaborative embeddings; utgrec: Qwen2-VL (or text encoder) + "
                        "tree codebooks + text / image decoders under DeepSpeed")
    u.add_argument("--deepspeed", default=None, help="DeepSpeed config (ds_configs/zero3.json, ...)")
    u.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    u.add_argument("--init_from", default=None, help="pre-trained UTGRec tokenizer to fine-tune from")
    u.add_argument("--launcher", choices=("none", "deepspeed"), default="none",
                   help="none: this process, one rank; deepspeed: start the deepspeed launcher")
    u.add_argument("--num_gpus", type=int, default=1, help="ranks per node with --launcher deepspeed")
    u.add_argument("--master_port", type=int, default=None, help="rendezvous port for --launcher deepspeed")
    p.set_defaults(_overrides=True)
    return p


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    """Dispatch to the tokenizer plug-in: in this process (``run_cli``), or as ``train_tokenizer.py`` (one rank
    here, or ``--launcher deepspeed``) for plug-ins with a run config."""
    import shutil
    import subprocess
    from pathlib import Path

    from megarec import train_tokenizer
    from megarec.methods.tokenizers import get_tokenizer

    plugin = get_tokenizer(args.method)
    if plugin.config_cls is None:
        return plugin.run_cli(args)
    argv = ["--method", plugin.name, *(["--config", args.config] if args.config else []),
            *(["--deepspeed", args.deepspeed] if args.deepspeed else []),
            *(["--resume"] if args.resume else []), *(["--init_from", args.init_from] if args.init_from else []),
            *[a for k, v in plugin.cli_overrides(args) for a in (f"--{k}", v)], *args.overrides]
    if args.launcher == "deepspeed":
        port = ["--master_port", str(args.master_port)] if args.master_port else []
        exe = shutil.which("deepspeed")
        launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
        return subprocess.call([*launcher, "--num_gpus", str(args.num_gpus), *port,
                                str(Path(train_tokenizer.__file__)), *argv])
    return train_tokenizer.main(argv)


# --------------------------------------------------------------------------- tokenize
def _add_tokenize(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tokenize", help="assign codes to every item of one or more domains with a trained tokenizer",
                       description="Write one codes file (megarec-codes/1) with the semantic ID of every item of "
                                   "the PATHs, using the tokenizer trained by `megarec train-tokenizer`; collisions "
                                   "are resolved over all the PATHs' items, so IDs are unique across domains.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="domain folder or file (any supported format); several: one shared code space")
    p.add_argument("--model", required=True, help="folder written by `megarec train-tokenizer`")
    p.add_argument("--out", required=True, help="codes file to write (.safetensors)")
    p.add_argument("--collisions", choices=("utgrec", "dedup", "none"), default=None,
                   help="utgrec: move colliding last codes to the nearest free code; dedup: TIGER's extra level; "
                        "none: keep collisions (default: the tokenizer's config)")
    p.add_argument("--embeddings", default=None, help="item embeddings file, for a tokenizer trained on embeddings")
    p.add_argument("--kcore", type=int, default=None, help="k-core filtering (default: the format's)")
    return p


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megarec.data.readers import read_domain
    from megarec.tokenizer.commands import check_inputs, domains_summary, summary_rows, tokenize
    from megarec.tokenizer.rqvae import RQVAE

    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the codes file to write (.safetensors)")
    _, cfg, extra = RQVAE.load(args.model)            # not a trained tokenizer: DataError naming --model
    if extra.get("input") == "embeddings" and args.embeddings is None:
        raise DataError(f"the tokenizer in {args.model} was trained on item embeddings ({extra.get('embeddings')}); "
                        "pass --embeddings FILE with the same kind of embeddings for these domains")
    check_inputs(cfg, args.embeddings)
    domains = [read_domain(p, kcore=args.kcore, text_fields=cfg.text_fields) for p in args.paths]
    codes = tokenize(args.model, domains, args.out, args.collisions, args.embeddings)
    print(format_table(summary_rows(codes.stats), ["level", "usage", "perplexity", "entropy"]))
    print(f"collision rate {codes.stats['collision_rate_before']:.4f} before, "
          f"{codes.stats['collision_rate_after']:.4f} after ({codes.stats['policy']}); "
          f"{len(codes.item_keys):,} items -> {args.out}")
    if line := domains_summary(codes.stats):
        print(line)
    return 0


# --------------------------------------------------------------------------- train-rec
def _add_train_rec(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train-rec", help="train and evaluate a recommender (any method: sasrec, tiger, etegrec, unigrec, utgrec) with DeepSpeed",
                       description="Run megarec/train_rec.py: read data.paths, train `method` with AdamW + warmup "
                                   "+ cosine, evaluate every train.eval_every epochs, stop early on validation "
                                   "NDCG@10, test the best model; outputs under train.run_dir. Runs in this "
                                   "process on one rank, or with --launcher deepspeed on --num_gpus ranks. Any "
                                   "config key can follow as --key value, e.g. --method sasrec --train.lr 1e-3 "
                                   "--data.paths A,B --data.codes codes.safetensors.")
    p.add_argument("--config", default=None, help="YAML file of TrainRecConfig keys")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config (ds_configs/zero2.json, zero3.json, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.run_dir")
    p.add_argument("--init_from", default=None, help="weights to fine-tune from (model.safetensors, run folder "
                                                     "or DeepSpeed checkpoint)")
    p.add_argument("--profile", default=None, help="the method's preset (megarec/configs/<method>/<profile>.yaml): "
                                                   "paper, cpu-small, quickstart, tiny; --config and overrides win")
    p.add_argument("--launcher", choices=("none", "deepspeed"), default="none",
                   help="none: this process, one rank; deepspeed: start the deepspeed launcher")
    p.add_argument("--num_gpus", type=int, default=1, help="ranks per node with --launcher deepspeed "
                                                           "(CPU ranks when there is no GPU)")
    p.add_argument("--master_port", type=int, default=None, help="rendezvous port for --launcher deepspeed")
    p.set_defaults(_overrides=True)
    return p


def _cmd_train_rec(args: argparse.Namespace) -> int:
    import shutil
    import subprocess
    from pathlib import Path

    from megarec import train_rec

    argv = [*(["--config", args.config] if args.config else []),
            *(["--deepspeed", args.deepspeed] if args.deepspeed else []),
            *(["--resume"] if args.resume else []),
            *(["--init_from", args.init_from] if args.init_from else []),
            *(["--profile", args.profile] if args.profile else []), *args.overrides]
    if args.launcher == "deepspeed":
        from megarec.methods.training import check_inputs

        check_inputs(train_rec.parse_args(argv))   # config errors here, not on every rank after start-up
        port = ["--master_port", str(args.master_port)] if args.master_port else []
        exe = shutil.which("deepspeed")
        launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd = [*launcher, "--num_gpus", str(args.num_gpus), *port, str(Path(train_rec.__file__)), *argv]
        return subprocess.call(cmd)
    return train_rec.main(argv)


# --------------------------------------------------------------------------- recommend
def _add_recommend(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("recommend", help="top-K items for user histories from a trained recommender",
                       description="Print one JSON line per history: the top-K items (id, title, score) a model "
                                   "trained by `megarec train-rec` recommends next. Histories come from a JSON-lines "
                                   "file (each line a list of item ids, oldest first, or an object with 'history' "
                                   "and optional 'user'), or are the full sequences of --user ids of the domain.")
    p.add_argument("--model", required=True, help="run folder of `megarec train-rec` (or its model/ folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--histories", default=None, help="JSON-lines file of histories")
    src.add_argument("--user", nargs="+", default=None, help="user ids of the domain")
    p.add_argument("--domain", default=None, help="domain to recommend from (needed when the model has several)")
    p.add_argument("--topk", type=int, default=10, help="items per history")
    p.add_argument("--batch_size", type=int, default=256, help="histories per model call")
    return p


def _cmd_recommend(args: argparse.Namespace) -> int:
    import numpy as np

    from megarec.data.histories import read_histories
    from megarec.methods.training import load_trained

    if args.topk < 1:
        raise ConfigError("--topk must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch_size must be >= 1")
    given = read_histories(args.histories) if args.histories else None   # file errors before the model loads
    trained = load_trained(args.model, args.domain)
    names = [d.name for d in trained.domains]
    if args.domain is None and len(names) > 1:
        raise ConfigError(f"the model was trained on several domains {names}; choose one with --domain")
    dom_i = names.index(args.domain) if args.domain else 0
    dom = trained.domains[dom_i]
    offset = sum(d.num_items for d in trained.domains[:dom_i])
    index = {iid: i for i, iid in enumerate(dom.item_ids)}
    if args.user:
        users = {u: i for i, u in enumerate(dom.users)}
        missing = [u for u in args.user if u not in users]
        if missing:
            raise DataError(f"users not in domain {dom.name!r}: {missing[:5]}")
        rows = [(u, [dom.item_ids[i] for i in dom.sequences[users[u]]]) for u in args.user]
    else:
        rows = given
    histories = []
    for n, (_, hist) in enumerate(rows, 1):
        ids = [str(h).split("/", 1)[1] if str(h).startswith(dom.name + "/") else str(h) for h in hist]
        bad = [h for h in ids if h not in index]
        if bad:
            raise DataError(f"history {n}: items not in domain {dom.name!r}: {bad[:5]}")
        histories.append(np.asarray([index[h] + offset for h in ids], dtype=np.int64))
    keys = trained.item_keys()
    all_text = [t for d in trained.domains for t in (d.item_text or [{}] * d.num_items)]
    for start in range(0, len(histories), args.batch_size):
        items, scores = trained.recommender.recommend(histories[start:start + args.batch_size], args.topk)
        for r, (item_row, score_row) in enumerate(zip(items.tolist(), scores.tolist())):
            user, hist = rows[start + r]
            recs = [{"item": keys[i].split("/", 1)[1], "title": all_text[i].get("title", ""), "score": round(s, 6)}
                    for i, s in zip(item_row, score_row) if i >= 0]
            print(json.dumps({"user": user, "domain": dom.name, "history": [str(h) for h in hist],
                              "recommendations": recs}))
    return 0


# --------------------------------------------------------------------------- export-embeddings
def _add_export_embeddings(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export-embeddings", help="write a trained SASRec's item embeddings to a file",
                       description="Read the run (or model/) folder of `megarec train-rec --method sasrec` and "
                                   "write its item embeddings as a megarec-embeddings/1 safetensors file (rows keyed "
                                   "'<domain>/<item id>', source 'sasrec'): the collaborative input of ETEGRec's "
                                   "tokenizer and UniGRec's distillation (`megarec train-tokenizer --embeddings`).")
    p.add_argument("model", help="run folder of `megarec train-rec --method sasrec` (or its model/ folder)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    return p


def _cmd_export_embeddings(args: argparse.Namespace) -> int:
    from megarec.recommender.sasrec import SASRec, export_item_embeddings
    from megarec.methods.training import load_trained

    trained = load_trained(args.model)
    model = getattr(getattr(trained.recommender, "ranker", None), "model", None)
    if not isinstance(model, SASRec):
        raise ConfigError(f"{args.model}: a {trained.cfg.method!r} model has no item-embedding table to export; "
                          "train one with --method sasrec")
    keys = trained.item_keys()
    export_item_embeddings(model, keys, args.out)
    print(f"wrote {len(keys)} x {model.cfg.hidden} SASRec item embeddings to {args.out}")
    return 0


COMMANDS: list[tuple[Callable, Callable]] = [
    (_add_quickstart, _cmd_quickstart),
    (_add_stats, _cmd_stats),
    (_add_download_images, _cmd_download_images),
    (_add_build_shards, _cmd_build_shards),
    (_add_train_tokenizer, _cmd_train_tokenizer),
    (_add_tokenize, _cmd_tokenize),
    (_add_train_rec, _cmd_train_rec),
    (_add_recommend, _cmd_recommend),
    (_add_export_embeddings, _cmd_export_embeddings),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarec", description="MegaRec: generative recommendation with semantic IDs")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add, run in COMMANDS:
        p = add(sub)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that take ``--key value`` config overrides set ``_overrides=True`` (see _add_train_tokenizer);
    # their unknown options arrive as ``args.overrides``; anywhere else they are an error as usual.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (DataError, ConfigError) as e:
        print(f"megarec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
