"""TIGER (Rajput et al., 2023) as a plug-in: RQ-VAE codes of the item text, a T5, trie-constrained beam search."""
