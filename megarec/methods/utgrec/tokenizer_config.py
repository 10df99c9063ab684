"""The run config of UTGRec's tokenizer training (``train_tokenizer.py --method utgrec``): item shards
(``data``), the model (``utgrec``: :class:`~megarec.methods.utgrec.tokenizer.UTGRecTokenizerConfig`), the
optimisation and run folder (``train``) and the code export (``export``)."""
from __future__ import annotations

import dataclasses

from megarec.config import field
from megarec.methods.utgrec.tokenizer import UTGRecTokenizerConfig


@dataclasses.dataclass
class TokDataConfig:
    shards: str = field("", help="item shard folder (`megarec build-shards`; several domains = multi-domain)")
    text_fields: list[str] | None = field(None, help="item text fields joined into the item text (none = all)")
    on_bad_sample: str = field("skip", choices=("skip", "fail"), help="corrupt sample or undecodable image")
    num_workers: int = field(0, min=0, help="DataLoader workers per rank: they decode anchors and positives, run the "
                                            "image processor and tokenizer and read cached latents (0 = the "
                                            "main process; GPU runs: 4-8)")
    prefetch_factor: int = field(4, min=1, help="batches each worker prepares ahead (with num_workers > 0)")
    shuffle_buffer: int = field(1000, min=1)
    heldout_items: int = field(512, min=0, help="items whose codes give the logged collision rate (0 = none)")


@dataclasses.dataclass
class TokTrainConfig:
    lr: float = field(3e-4, min=0.0, help="peak learning rate (paper: 3e-4 pre-training, 1e-4 fine-tuning)")
    weight_decay: float = field(0.0, min=0.0)
    warmup_steps: int = field(0, min=0, help="linear LR warmup steps, then cosine")
    min_lr_ratio: float = field(0.0, min=0.0, max=1.0)
    epochs: int = field(3, min=0, help="passes over the shards (0 with max_steps 0: only export codes)")
    max_steps: int = field(0, min=0, help="stop after this many optimizer steps (0 = epochs decide)")
    batch_size: int = field(16, min=1, help="anchor items per rank and step (each brings one positive)")
    seed: int = field(2024, min=0)
    run_dir: str = field("runs/utgrec_tokenizer")
    deepspeed: str = field("", help="DeepSpeed config JSON (empty = built-in: ZeRO 0, fp32 CPU, bf16 GPU)")
    log_every: int = field(10, min=1)
    eval_every: int = field(500, min=1, help="steps between held-out collision rates")
    save_every_steps: int = field(500, min=1)
    keep_checkpoints: int = field(2, min=1)
    init_from: str = field("", help="pre-trained tokenizer (its export folder model/ or run folder) to start "
                                    "from; the frozen base comes from utgrec.encoder.path")
    finetune: bool = field(False, help="Sec. 2.4.2: freeze E^r, E^f (needs init_from); no codebook warm-up")
    resume: bool = field(False)
    progress: bool = field(True)
    cpu_threads: int = field(0, min=0, help="torch threads per rank on CPU (0 = cores / local ranks)")
    peak_tflops: float = field(0.0, min=0.0, help="peak TFLOP/s of one device for perf/mfu (0 = a known GPU's "
                                                  "bf16 dense peak by name; on CPU perf/mfu needs this)")
    dist_timeout_s: int = field(3600, min=1, help="collective timeout in seconds (start-up, catalogue export)")


@dataclasses.dataclass
class ExportConfig:
    codes: bool = field(True, help="write run_dir/codes.safetensors at the end")
    domains: list[str] | None = field(None, help="domains to export (none = every domain of the shards)")
    collisions: str = field("utgrec", choices=("utgrec", "dedup", "none"))
    batch_size: int = field(32, min=1, help="items per rank and encoder pass")


@dataclasses.dataclass
class TrainTokenizerConfig:
    method: str = field("utgrec", choices=("utgrec",))
    data: TokDataConfig = field(default_factory=TokDataConfig)
    utgrec: UTGRecTokenizerConfig = field(default_factory=UTGRecTokenizerConfig)
    train: TokTrainConfig = field(default_factory=TokTrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
