"""nearest_code / topk_codes / code_probs against naive references (cdist, full softmax).

The ``test_triton_*`` tests run the Triton kernels: compiled when CUDA is present,
and on CPU in Triton's interpreter through ``test_triton_kernels_in_interpreter``,
which re-runs them in a subprocess with TRITON_INTERPRET=1 (the variable must be
set before triton is first imported).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import megarec.kernels.codebook as cb
from megarec.kernels import code_probs, nearest_code, topk_codes
from megarec.kernels._dispatch import interpret_mode, resolve_backend, triton_available
from tests.triton_util import needs_interpreter_subprocess, needs_triton, run_in_interpreter, triton_device

TAUS = (0.05, 0.2, 1.0)


def _odd_shapes(seed: int, max_n: int = 300, max_k: int = 140, max_d: int = 70) -> tuple[int, int, int]:
    g = torch.Generator().manual_seed(seed)
    n, k, d = (int(torch.randint(lo, hi, (1,), generator=g)) | 1 for lo, hi in ((3, max_n), (3, max_k), (3, max_d)))
    return n, k, d


def _data(seed: int, n: int, k: int, d: int, device: str = "cpu", scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale
    C = torch.randn(k, d, generator=g) * scale
    return x.to(device), C.to(device)


def _naive_sqdist(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return ((x.double()[:, None, :] - C.double()[None, :, :]) ** 2).sum(-1)


def _check_nearest(x, C, idx, dist):
    D = _naive_sqdist(x, C)
    ref = torch.cdist(x.double(), C.double()).argmin(1)
    # Indices must agree wherever the runner-up is not within float32 rounding of the best.
    top2 = D.topk(2, dim=1, largest=False).values
    clear = top2[:, 1] - top2[:, 0] > 1e-4 * (1 + top2[:, 0])
    assert clear.float().mean() > 0.9
    assert torch.equal(idx.cpu()[clear.cpu()], ref.cpu()[clear.cpu()])
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    torch.testing.assert_close(dist.double().cpu(), D.min(1).values.cpu(), rtol=1e-4, atol=1e-4)


def _check_topk(x, C, k, idx, dist):
    D = _naive_sqdist(x, C).cpu()
    assert idx.shape == (x.shape[0], k) and dist.shape == (x.shape[0], k)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "distances must be ascending"
    torch.testing.assert_close(dist.double().cpu(), D.sort(1).values[:, :k], rtol=1e-4, atol=1e-4)
    # The returned indices really have the returned distances.
    torch.testing.assert_close(D.gather(1, idx.cpu()), dist.double().cpu(), rtol=1e-4, atol=1e-4)


def _naive_probs(x, C, tau):
    return F.softmax(-torch.cdist(x, C) ** 2 / tau, dim=1)


def _check_probs(x, C, tau, backend):
    xr, Cr = x.clone().requires_grad_(), C.clone().requires_grad_()
    P = code_probs(xr, Cr, tau, backend=backend)
    g = torch.randn_like(P)
    (P * g).sum().backward()
    xn, Cn = x.double().requires_grad_(), C.double().requires_grad_()
    Pn = F.softmax(-_naive_sqdist(xn, Cn) / tau, dim=1)
    (Pn * g.double()).sum().backward()
    torch.testing.assert_close(P.double(), Pn, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(xr.grad.double(), xn.grad, rtol=1e-3, atol=1e-3 * float(xn.grad.abs().max()))
    torch.testing.assert_close(Cr.grad.double(), Cn.grad, rtol=1e-3, atol=1e-3 * float(Cn.grad.abs().max()))


# --------------------------------------------------------------------------- PyTorch path
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so odd shapes cross several (and partial) chunk boundaries."""
    monkeypatch.setattr(cb, "_CHUNK_ELEMS", 997)


@pytest.mark.parametrize("seed", range(6))
def test_nearest_code_matches_cdist(seed, small_chunks):
    n, k, d = _odd_shapes(seed)
    x, C = _data(seed, n, k, d)
    _check_nearest(x, C, *nearest_code(x, C, backend="torch"))


@pytest.mark.parametrize("seed", range(4))
def test_topk_codes_matches_sorted_distances(seed, small_chunks):
    n, K, d = _odd_shapes(100 + seed)
    k = min(K, 1 + 2 * seed)
    x, C = _data(seed, n, K, d)
    _check_topk(x, C, k, *topk_codes(x, C, k, backend="torch"))


def test_topk_first_column_is_nearest_code(small_chunks):
    x, C = _data(7, 211, 67, 13)
    i1, d1 = nearest_code(x, C, backend="torch")
    ik, dk = topk_codes(x, C, 5, backend="torch")
    assert torch.equal(ik[:, 0], i1)
    torch.testing.assert_close(dk[:, 0], d1)


def _tied():
    """Integer data (exact arithmetic) with duplicated codes: exact distance ties."""
    g = torch.Generator().manual_seed(3)
    C = torch.randint(-3, 4, (6, 5), generator=g).float()
    C = torch.cat([C, C[[2, 0]], C])  # codes 6, 7 duplicate 2, 0; codes 8..13 duplicate 0..5
    x = torch.cat([C[[2, 0, 5]], torch.randint(-3, 4, (40, 5), generator=g).float()])
    return x, C


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_ties_go_to_the_lowest_index(backend):
    x, C = _tied()
    dev = triton_device() if backend == "triton" else "cpu"
    idx, dist = nearest_code(x.to(dev), C.to(dev), backend=backend)
    D = _naive_sqdist(x, C)
    first_min = (D == D.min(1, keepdim=True).values).float().argmax(1)  # lowest index among minima
    assert torch.equal(idx.cpu(), first_min)
    assert idx[:3].tolist() == [2, 0, 5]
    ik, dk = topk_codes(x.to(dev), C.to(dev), 4, backend=backend)
    # (distance, index) lexicographic order
    ref = sorted(range(C.shape[0]), key=lambda j: (float(D[0, j]), j))[:4]
    assert ik[0].tolist() == ref and ik[0, :3].tolist() == [2, 6, 10]
    for r in range(x.shape[0]):
        order = sorted(range(C.shape[0]), key=lambda j: (float(D[r, j]), j))[:4]
        assert ik[r].tolist() == order


def test_topk_with_k_equal_codebook_size_is_a_full_sort():
    x, C = _data(5, 33, 17, 9)
    idx, dist = topk_codes(x, C, 17, backend="torch")
    assert torch.equal(idx.sort(1).values, torch.arange(17).expand(33, 17))
    _check_topk(x, C, 17, idx, dist)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("seed", range(3))
def test_code_probs_forward_backward(seed, tau, small_chunks):
    n, k, d = _odd_shapes(200 + seed, max_n=120, max_k=90, max_d=40)
    x, C = _data(seed, n, k, d, scale=0.3)
    _check_probs(x, C, tau, "torch")


def test_code_probs_matches_softmax_of_negative_cdist_squared():
    x, C = _data(11, 63, 31, 7)
    P = code_probs(x, C, 0.5, backend="torch")
    torch.testing.assert_close(P, _naive_probs(x, C, 0.5), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(P.sum(1), torch.ones(63))
    # The nearest code is the most probable one (negative distances are the logits).
    assert torch.equal(P.argmax(1), nearest_code(x, C, backend="torch")[0])


def test_code_probs_accepts_tensor_tau_and_keeps_low_precision_dtype():
    x, C = _data(12, 9, 5, 4)
    P = code_probs(x, C, torch.tensor(0.3), backend="torch")
    torch.testing.assert_close(P, _naive_probs(x, C, 0.3), rtol=1e-4, atol=1e-6)
    Pb = code_probs(x.bfloat16(), C.bfloat16(), 0.3, backend="torch")
    assert Pb.dtype == torch.bfloat16


def test_empty_input():
    C = torch.randn(4, 3)
    idx, dist = nearest_code(torch.empty(0, 3), C, backend="torch")
    assert idx.shape == (0,) and dist.shape == (0,)
    idx, dist = topk_codes(torch.empty(0, 3), C, 2, backend="torch")
    assert idx.shape == (0, 2)
    x = torch.empty(0, 3, requires_grad=True)
    code_probs(x, C, 0.5, backend="torch").sum().backward()
    assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: nearest_code(torch.randn(4, 3), torch.randn(5, 4)), "dimension 3 but the codebook has 4"),
    (lambda: nearest_code(torch.randn(4), torch.randn(5, 4)), r"x must be \[N, d\]"),
    (lambda: nearest_code(torch.randn(4, 3), torch.randn(0, 3)), "empty"),
    (lambda: nearest_code(torch.randint(0, 3, (4, 3)), torch.randn(5, 3)), "floating point"),
    (lambda: topk_codes(torch.randn(4, 3), torch.randn(5, 3), 6), r"k must be in \[1, 5\]"),
    (lambda: topk_codes(torch.randn(4, 3), torch.randn(5, 3), 0), r"k must be in \[1, 5\]"),
    (lambda: code_probs(torch.randn(4, 3), torch.randn(5, 3), 0.0), "tau must be > 0"),
    (lambda: nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.skipif(interpret_mode(), reason="interpreter accepts CPU tensors")
def test_forcing_the_kernel_backend_on_cpu_explains_why():
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        resolve_backend("triton", torch.randn(2, 2))
    assert resolve_backend("auto", torch.randn(2, 2)) == "torch"


# --------------------------------------------------------------------------- Triton kernels
@needs_triton
@pytest.mark.parametrize("n, k, d", [(77, 45, 19), (5, 131, 3)])
def test_triton_nearest_code(n, k, d):
    x, C = _data(n, n, k, d, device=triton_device())
    assert resolve_backend("auto", x, C) == "triton"
    _check_nearest(x, C, *nearest_code(x, C, backend="triton"))


@needs_triton
def test_triton_topk_codes():
    x, C = _data(1, 29, 83, 21, device=triton_device())  # two codebook tiles; kept tiny for the interpreter
    for k in (1, 5):
        idx, dist = topk_codes(x, C, k, backend="triton")
        _check_topk(x, C, k, idx, dist)
        ti, td = topk_codes(x.cpu(), C.cpu(), k, backend="torch")
        assert torch.equal(idx.cpu(), ti)


@needs_triton
@pytest.mark.parametrize("tau", TAUS)
def test_triton_code_probs(tau):
    x, C = _data(2, 37, 71, 11, device=triton_device(), scale=0.3)
    _check_probs(x, C, tau, "triton")


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="bf16 kernels need a GPU")
def test_triton_bf16_on_gpu():
    x, C = _data(3, 1001, 257, 64, device="cuda")
    idx, dist = nearest_code(x.bfloat16(), C.bfloat16(), backend="triton")
    ref_i, ref_d = nearest_code(x.bfloat16().float(), C.bfloat16().float(), backend="torch")
    assert (idx == ref_i).float().mean() > 0.98
    torch.testing.assert_close(dist, ref_d, rtol=2e-2, atol=2e-2)
    P = code_probs(x.bfloat16(), C.bfloat16(), 0.5, backend="triton")
    torch.testing.assert_close(P.float(), _naive_probs(x.bfloat16().float(), C.bfloat16().float(), 0.5),
                               rtol=5e-2, atol=5e-3)


@needs_interpreter_subprocess
def test_triton_kernels_in_interpreter():
    run_in_interpreter(__file__)
