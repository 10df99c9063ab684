"""WebDataset item shards: the public entry points.

- :func:`write_shards` (``megarec build-shards``): domains -> ``items-%06d.tar`` + ``index.json``;
- :class:`ShardDataset` / :class:`ShardLoader`: shuffled, rank/worker-split reading with
  equal batch counts per rank, mid-epoch resume and bad-sample handling;
- :func:`collate_items`: batches of item samples.

Format: :mod:`megarec.data.shard_format`; reader semantics: :mod:`megarec.data.shard_reader`.
"""
from megarec.data.shard_format import FORMAT, load_manifest, safe_key, unsafe_key
from megarec.data.shard_reader import ShardDataset, ShardLoader, collate_items
from megarec.data.shard_writer import domain_positives, write_shards

__all__ = ["FORMAT", "ShardDataset", "ShardLoader", "collate_items", "domain_positives", "load_manifest",
           "safe_key", "unsafe_key", "write_shards"]
