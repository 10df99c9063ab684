"""Item tokenizers: residual (hard), soft and tree-structured codebooks, the RQ-VAE, its inputs,
and catalogue code assignment with collision handling.

- :mod:`.residual` -- ``ResidualQuantizer`` (ETEGRec Eqs. 4-5, 10), k-means init, dead-code restarts (ZeRO-3 safe)
- :mod:`.soft`     -- ``SoftResidualQuantizer``, ``linear_tau`` (UniGRec Eq. 16), ``uniformity_loss`` (Eq. 17)
- :mod:`.tree`     -- ``TreeCodebooks`` (UTGRec Eqs. 3-7), ``prefix_residual`` and its inverse
- :mod:`.rqvae`    -- ``RQVAE`` (ETEGRec Eqs. 3, 7-9), save / load
- :mod:`.encoders` -- text embeddings from any HF encoder, collaborative embeddings from a file
- :mod:`.assign`   -- ``assign_catalogue``: codes, ``utgrec`` / ``dedup`` collision policies, statistics
- :mod:`.train`    -- ``train_rqvae``: the training loop of ``megarec train-tokenizer``
"""
from megarec.tokenizer.assign import (CollisionError, add_dedup_level, assign_catalogue, collision_rate, level_stats,
                                      random_collision_rate, resolve_collisions)
from megarec.tokenizer.kmeans import kmeans
from megarec.tokenizer.residual import QuantizerOutput, ResidualCodebooks, ResidualQuantizer, rq_loss, straight_through
from megarec.tokenizer.rqvae import RQVAE, reconstruction_loss
from megarec.tokenizer.soft import SoftResidualQuantizer, linear_tau, uniformity_loss
from megarec.tokenizer.tree import TreeCodebooks, code_loss, inverse_prefix_residual, prefix_residual

__all__ = [
    "CollisionError", "add_dedup_level", "assign_catalogue", "collision_rate", "level_stats", "random_collision_rate",
    "resolve_collisions", "kmeans", "QuantizerOutput", "ResidualCodebooks", "ResidualQuantizer", "rq_loss",
    "straight_through", "RQVAE", "reconstruction_loss", "SoftResidualQuantizer", "linear_tau", "uniformity_loss",
    "TreeCodebooks", "code_loss", "inverse_prefix_residual", "prefix_residual",
]
