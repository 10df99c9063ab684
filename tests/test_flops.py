"""engine/flops.py against hand-computed FLOPs: a 2-layer MLP with one frozen layer, gradient checkpointing
(recompute counted apart), attention, the device peak table and the loop's MFU arithmetic."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megarec.engine.flops import PEAK_BF16, StepFlopCounter, peak_flops

B, D, H, O = 8, 16, 32, 4


def _mlp():
    torch.manual_seed(0)
    first, second = nn.Linear(D, H), nn.Linear(H, O)
    return first, second


@pytest.fixture(autouse=True)
def torch_linear(monkeypatch):
    """Count against torch's own ``F.linear``: an in-process ZeRO-3 engine built by an earlier test of the same
    worker may have left DeepSpeed's memory-efficient linear (an autograd Function whose recompute runs
    without grad mode) in its place. Our ZeRO-3 configs set ``memory_efficient_linear: false``."""
    import torch.nn.functional as F

    monkeypatch.setattr(F, "linear", torch._C._nn.linear)


def _count(fn):
    c = StepFlopCounter()
    with c:
        loss = fn()
        c.phase = "backward"
        loss.backward()
    return c


def test_trainable_then_frozen_layer():
    """Trainable D->H, frozen H->O, input without grad: forward 2B(DH + HO); backward: the frozen layer's
    activation gradient 2BHO (no weight gradient), the trainable layer's weight gradient 2BDH (no activation
    gradient: nothing below needs it)."""
    first, second = _mlp()
    second.requires_grad_(False)
    x = torch.randn(B, D)
    c = _count(lambda: second(torch.relu(first(x))).sum())
    assert c.counts == {"forward": 2 * B * (D * H + H * O), "backward": 2 * B * H * O + 2 * B * D * H, "recompute": 0}
    assert c.model_flops == c.hardware_flops


def test_frozen_then_trainable_layer():
    """Frozen D->H below a trainable H->O: the frozen layer costs its forward only (no weight gradient, and
    nothing below it needs an activation gradient); the trainable layer its forward and weight gradient (its
    input, the frozen layer's output, needs no gradient)."""
    first, second = _mlp()
    first.requires_grad_(False)
    c = _count(lambda: second(torch.relu(first(torch.randn(B, D)))).sum())
    assert c.counts["forward"] == 2 * B * (D * H + H * O)
    assert c.counts["backward"] == 2 * B * H * O


def test_input_with_grad_costs_every_gradient():
    """Both layers trainable and the input needs a gradient (as LoRA below a frozen layer does): backward =
    2 x forward (activation + weight gradient of each layer): the 6 N tokens of a fully trained model."""
    first, second = _mlp()
    x = torch.randn(B, D, requires_grad=True)
    c = _count(lambda: second(torch.relu(first(x))).sum())
    fwd = 2 * B * (D * H + H * O)
    assert c.counts["forward"] == fwd and c.counts["backward"] == 2 * fwd


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recompute_is_hardware_flops_only(reentrant):
    first, second = _mlp()
    second.requires_grad_(False)
    x = torch.randn(B, D, requires_grad=reentrant)   # the reentrant variant needs an input with grad
    c = _count(lambda: second(checkpoint(lambda t: torch.relu(first(t)), x, use_reentrant=reentrant)).sum())
    assert c.counts["forward"] == 2 * B * (D * H + H * O)
    assert c.counts["recompute"] == 2 * B * D * H                     # the checkpointed layer's forward, again
    extra = 2 * B * D * H if reentrant else 0                        # x's gradient
    assert c.counts["backward"] == 2 * B * H * O + 2 * B * D * H + extra
    assert c.hardware_flops == c.model_flops + 2 * B * D * H


def test_attention_scores_are_counted():
    """One head, no projections: scores Q K^T (2 T T d) and values P V (2 T T d) per batch row."""
    T, d = 6, 8
    q, k, v = (torch.randn(2, 1, T, d, requires_grad=True) for _ in range(3))
    c = _count(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum())
    assert c.counts["forward"] == 2 * (2 * T * T * d + 2 * T * T * d)
    assert c.counts["backward"] > c.counts["forward"]   # dQ, dK, dV, dP (and the recomputed scores)


def test_peaks():
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", 1.5) == 1.5e12
    names = dict(PEAK_BF16)
    assert names["H200"] == names["H100"] == 989e12 and names["A100"] == 312e12
    if torch.cuda.is_available():   # a GPU of the table (the device check's H200) gets its peak
        name = torch.cuda.get_device_name(0)
        if any(k in name for k, _ in PEAK_BF16):
            assert peak_flops("cuda") is not None


def test_loop_mfu_arithmetic():
    """perf/mfu = FLOPs per sample x window samples / (seconds x ranks x peak)."""
    from megarec.engine.loop import TrainLoop, _Window

    loop = TrainLoop.__new__(TrainLoop)
    loop.peak, loop.accumulation = 1e12, 1
    loop.flops = {"model": 3e9, "hardware": 4e9}
    w = _Window(torch.device("cpu"))
    w.samples, w.seconds, w.steps, w.data_s = 200, 2.0, 10, 0.5
    perf = loop.perf_scalars(w)
    assert perf["mfu"] == pytest.approx(3e9 * 200 / 2.0 / 1e12) and perf["hfu"] == pytest.approx(0.4)
    assert perf["data_wait_frac"] == pytest.approx(0.25) and perf["step_s"] == pytest.approx(0.2)
