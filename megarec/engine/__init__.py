"""Training machinery shared by every method; it knows no model.

- :mod:`.deepspeed_setup`: process group, ``"auto"`` values of ds configs, engine, warmup + cosine LR;
- :mod:`.trainer`: the loop (:class:`~.trainer.Trainer` runs a method's :class:`~.trainer.TrainTask`),
  early stopping, best-model export, test pass;
- :mod:`.sampler`: per-rank batch order (resumable mid-epoch) and padded evaluation shards;
- :mod:`.checkpoint`: DeepSpeed checkpoints with exact resume, safetensors export / import (ZeRO-3 aware);
- :mod:`.tb`: TensorBoard scalars under stable tags.
"""
