"""ETEGRec (Liu et al., SIGIR 2025): RQ-VAE tokenizer and T5 trained end to end (``plugin``: config, schedule,
plug-in; ``model``: the joint model and its alignment losses)."""
