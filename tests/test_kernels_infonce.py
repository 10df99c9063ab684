"""infonce against the naive full-matrix loss (F.cross_entropy on B x B logits), and across 2 ranks.

The ``test_triton_*`` tests run compiled on CUDA, and on CPU in Triton's interpreter
through ``test_triton_kernels_in_interpreter`` (a subprocess with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from megarec.kernels import infonce
from megarec.kernels._dispatch import triton_available
from tests.dist import run_ranks
from tests.triton_util import needs_interpreter_subprocess, needs_triton, run_in_interpreter, triton_device

# The package exports the function ``infonce``, which shadows the submodule's attribute name.
inf = importlib.import_module("megarec.kernels.infonce")
TAUS = (0.05, 0.2, 1.0)


def naive_infonce(a, b, tau, bidirectional=True, reduction="mean", eps=1e-8):
    """The textbook loss: full logits matrix, cross-entropy with the diagonal as targets."""
    an, bn = F.normalize(a, dim=1, eps=eps), F.normalize(b, dim=1, eps=eps)
    S = an @ bn.t() / tau
    t = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(S, t, reduction=reduction)
    if bidirectional:
        loss = loss + F.cross_entropy(S.t(), t, reduction=reduction)
    return loss


def _pair(seed: int, B: int, d: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g) * torch.rand(B, 1, generator=g).add(0.2)  # varied norms
    b = a + 0.8 * torch.randn(B, d, generator=g)  # correlated positives
    return a.to(device), b.to(device)


def _compare(a, b, tau, backend, rtol=1e-4, **kw):
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = infonce(a1, b1, tau, backend=backend, **kw)
    loss.backward()
    a2, b2 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = naive_infonce(a2, b2, tau, **kw)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=1e-5)
    for got, want in ((a1.grad, a2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=rtol * float(want.abs().max()))


@pytest.fixture
def small_tiles(monkeypatch):
    """Odd tile sizes, so the batches below span several full and partial tiles."""
    monkeypatch.setattr(inf, "_TILE_Q", 23)
    monkeypatch.setattr(inf, "_TILE_K", 37)


def _odd(seed: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(20, 160, (1,), generator=g)) | 1, int(torch.randint(3, 70, (1,), generator=g)) | 1


# --------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bidirectional", [True, False])
def test_matches_naive_forward_backward(seed, tau, bidirectional, small_tiles):
    B, d = _odd(seed)
    a, b = _pair(seed, B, d)
    _compare(a, b, tau, "torch", bidirectional=bidirectional)


@pytest.mark.parametrize("tau", [0.01, 0.02])  # below _FIXED_SHIFT_MIN_TAU: the running-max path
def test_small_temperature_uses_running_max_and_stays_exact(tau, small_tiles):
    assert tau < inf._FIXED_SHIFT_MIN_TAU
    a, b = _pair(9, 101, 17)
    _compare(a, b, tau, "torch", rtol=2e-4)


def test_sum_reduction_and_default_tiles():
    a, b = _pair(4, 45, 8)
    _compare(a, b, 0.1, "torch", reduction="sum")
    _compare(a, b, 0.1, "torch", reduction="sum", bidirectional=False)


@pytest.mark.parametrize("tau", [0.03, 0.01])
def test_all_negative_similarities_give_log_batch(tau, small_tiles):
    """Every pair anti-aligned: each row's softmax is uniform, so each direction costs log(B)."""
    v = torch.randn(1, 6)
    a, b = v.repeat(50, 1), -v.repeat(50, 1)
    for bidirectional, directions in ((True, 2), (False, 1)):
        loss = infonce(a, b, tau, bidirectional=bidirectional, backend="torch")
        torch.testing.assert_close(loss, torch.tensor(directions * math.log(50)), rtol=1e-5, atol=1e-4)


def test_zero_row_is_handled_by_eps():
    a, b = _pair(5, 31, 9)
    a[3] = 0
    _compare(a, b, 0.2, "torch")


def test_backward_keeps_no_batch_by_batch_tensor():
    """Only O(B d) tensors are saved for backward (the naive loss saves the B x B logits)."""
    B, d = 300, 8
    a, b = _pair(6, B, d)
    a.requires_grad_()
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        infonce(a, b, 0.1, backend="torch")
    assert saved and max(saved) <= B * d
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        naive_infonce(a, b, 0.1)
    assert max(saved) >= B * B  # the check above can fail


@pytest.mark.parametrize("use_triton", [pytest.param(False, id="torch"),
                                        pytest.param(True, marks=needs_triton, id="triton")])
def test_keys_from_a_larger_batch_with_offset(use_triton):
    """The distributed building block: local queries against gathered keys, positives at an offset."""
    dev = triton_device() if use_triton else "cpu"
    q, _ = _pair(7, 19, 11, dev)
    _, k = _pair(8, 53, 11, dev)
    off, tau = 21, 0.1
    qn, kn = F.normalize(q, dim=1).requires_grad_(), F.normalize(k, dim=1).requires_grad_()
    loss = inf._InfoNCE.apply(qn, kn, tau, off, 1.0, 0.0, use_triton)
    loss.backward()
    q2, k2 = qn.detach().double().requires_grad_(), kn.detach().double().requires_grad_()
    ref = F.cross_entropy(q2 @ k2.t() / tau, torch.arange(off, off + 19, device=dev), reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qn.grad.double(), q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kn.grad.double(), k2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: infonce(torch.randn(4, 3), torch.randn(5, 3), 0.1), r"both be \[B, d\]"),
    (lambda: infonce(torch.randn(4), torch.randn(4), 0.1), r"both be \[B, d\]"),
    (lambda: infonce(torch.randn(0, 3), torch.randn(0, 3), 0.1), "empty batch"),
    (lambda: infonce(torch.randn(4, 3), torch.randn(4, 3), -1.0), "tau must be > 0"),
    (lambda: infonce(torch.randn(4, 3), torch.randn(4, 3), 0.1, reduction="none"), "reduction must be one of"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- 2 ranks
def _ranks_case(rank: int, world: int, cases: list) -> list:
    """Each rank: a slice of the batch through shared linear maps, infonce with gathered keys,
    backward, then the gradient averaging DeepSpeed/DDP performs."""
    import torch.distributed as dist

    inf._TILE_Q, inf._TILE_K = 7, 11  # several tiles per rank, offsets inside tiles
    out = []
    for xa, xb, Wa, Wb, sizes, tau, bidirectional, reduction in cases:
        start, n = sum(sizes[:rank]), sizes[rank]
        Wa, Wb = Wa.clone().requires_grad_(), Wb.clone().requires_grad_()
        loss = infonce(xa[start:start + n] @ Wa, xb[start:start + n] @ Wb, tau, bidirectional=bidirectional,
                       reduction=reduction, backend="torch")
        loss.backward()
        grads = [Wa.grad, Wb.grad]
        for g in grads:
            dist.all_reduce(g)
            g /= world
        out.append((loss.item(), [g.tolist() for g in grads]))  # plain lists: tensors sent through the
    return out                                                  # queue would outlive their sender's shm


def test_two_ranks_equal_single_process_on_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    cases = []
    for sizes, tau, bidirectional, reduction in (((13, 13), 0.1, True, "mean"), ((9, 14), 0.05, False, "mean"),
                                                 ((10, 10), 0.5, True, "sum")):
        B = sum(sizes)
        xa, xb = torch.randn(B, 12, generator=g), torch.randn(B, 12, generator=g)
        Wa, Wb = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
        cases.append((xa, xb, Wa, Wb, sizes, tau, bidirectional, reduction))
    results = run_ranks(_ranks_case, world_size=2, args=(cases,))
    for c, (xa, xb, Wa, Wb, sizes, tau, bidirectional, reduction) in enumerate(cases):
        Wa1, Wb1 = Wa.clone().requires_grad_(), Wb.clone().requires_grad_()
        ref = naive_infonce(xa @ Wa1, xb @ Wb1, tau, bidirectional, reduction)
        ref.backward()
        mean_loss = sum(r[c][0] for r in results) / 2
        assert mean_loss == pytest.approx(ref.item(), rel=1e-5), (sizes, reduction)
        for r in results:
            torch.testing.assert_close(torch.tensor(r[c][1][0]), Wa1.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.tensor(r[c][1][1]), Wb1.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- Triton kernels
@needs_triton
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_triton_matches_naive(tau, bidirectional):
    a, b = _pair(1, 71, 19, triton_device())  # crosses one 64-row block
    _compare(a, b, tau, "triton", bidirectional=bidirectional)


@needs_triton
def test_triton_small_temperature_and_wide_rows():
    a, b = _pair(2, 37, 83, triton_device())  # d spans two 64-wide chunks
    _compare(a, b, 0.01, "triton", rtol=2e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="bf16 kernels need a GPU")
def test_triton_bf16_on_gpu():
    a, b = _pair(3, 4099, 128, "cuda")
    a1, b1 = a.bfloat16().requires_grad_(), b.bfloat16().requires_grad_()
    loss = infonce(a1, b1, 0.07, backend="triton")
    loss.backward()
    a2, b2 = a.bfloat16().float().requires_grad_(), b.bfloat16().float().requires_grad_()
    ref = naive_infonce(a2, b2, 0.07)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    assert a1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a1.grad.float(), a2.grad, rtol=3e-2, atol=3e-2 * float(a2.grad.abs().max()))


@needs_interpreter_subprocess
def test_triton_kernels_in_interpreter():
    run_in_interpreter(__file__)
