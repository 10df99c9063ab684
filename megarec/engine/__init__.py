"""Training machinery shared by every method; it knows no model.

- :mod:`.deepspeed_setup`: process group, ``"auto"`` values of ds configs, engine, warmup + cosine LR;
- :mod:`.loop`: the one training loop (:class:`~.loop.TrainLoop` runs a :class:`~.loop.LoopTask`: steps,
  gradient accumulation, logging windows, checkpoints, preemption, resume, progress, evaluation hooks);
- :mod:`.sources`: its batch sources (:class:`~.sources.EpochBatches` of sample indices,
  :class:`~.sources.StreamBatches` over a resumable loader);
- :mod:`.trainer`: the recommender's run on the loop (:class:`~.trainer.Trainer` runs a method's
  :class:`~.trainer.TrainTask`), early stopping, best-model export, test pass;
- :mod:`.sampler`: per-rank batch order (resumable mid-epoch) and padded evaluation shards;
- :mod:`.checkpoint`: DeepSpeed checkpoints with exact resume, safetensors export / import (ZeRO-3 aware);
- :mod:`.tb`: TensorBoard scalars under stable tags.
"""
