import os

# Every test runs on CPU; DeepSpeed must not probe for accelerators.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two cores, and the suite runs under pytest-xdist with two workers (plus 2-rank subprocesses):
# one intra-op thread per process avoids oversubscription that slows tiny ops by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
