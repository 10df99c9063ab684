"""The RQ-VAE tokenizer as a plug-in of ``megarec train-tokenizer`` (``--method rqvae``, the default).

One RQ-VAE on the item text (or collaborative embeddings, ``--embeddings``) of one or more
domains, trained in this process (:mod:`megarec.tokenizer.commands`); the codes of every item
are assigned over the merged catalogue. TIGER, ETEGRec and UniGRec run the same steps as their
pipeline stages (:func:`megarec.tokenizer.commands.codes_for`).
"""
from __future__ import annotations

import argparse

from megarec.methods.tokenizers import TokenizerPlugin


class RQVAETokenizer(TokenizerPlugin):
    name = "rqvae"

    def run_cli(self, args: argparse.Namespace) -> int:
        from megarec.config import TokenizerConfig, load_config
        from megarec.data.readers import read_domain
        from megarec.formatting import format_table
        from megarec.tokenizer.commands import check_inputs, domains_summary, summary_rows, train_tokenizer

        cfg = load_config(TokenizerConfig, args.config, args.overrides)
        check_inputs(cfg, args.embeddings)
        domains = [read_domain(p, kcore=args.kcore, text_fields=cfg.text_fields) for p in args.paths]
        if args.embeddings is None:
            for domain in domains:
                domain.require_text("train-tokenizer")
        stats = train_tokenizer(domains, cfg, args.out, embeddings=args.embeddings)
        print(format_table(summary_rows(stats), ["level", "usage", "perplexity", "entropy"]))
        print(f"collision rate {stats['collision_rate_before']:.4f} before, {stats['collision_rate_after']:.4f} "
              f"after ({stats['policy']}); uniformly random codes: {stats['random_codes_collision_rate']:.4f}; "
              f"identical inputs: {stats['duplicate_input_rate']:.4f}")
        if line := domains_summary(stats):
            print(line)
        print(f"tokenizer, codes and stats written to {args.out}")
        return 0
