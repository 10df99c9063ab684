"""Residual, soft and tree codebooks: every loss against a naive computation of its formula."""
import math

import pytest
import torch

from megarec.tokenizer import (ResidualQuantizer, SoftResidualQuantizer, TreeCodebooks, code_loss,
                               inverse_prefix_residual, kmeans, linear_tau, prefix_residual, rq_loss,
                               straight_through, uniformity_loss)


def brute_nearest(x, C):
    return torch.tensor([min(range(len(C)), key=lambda k: float(((xi - C[k]) ** 2).sum())) for xi in x])


# ----------------------------------------------------------------------------- hard RQ
def test_rq_loss_matches_formula_and_routes_gradients():
    torch.manual_seed(0)
    v = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    e = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    beta = 0.3
    loss = rq_loss(v, e, beta)
    naive = 0.0
    for vl, el in zip(v, e):
        naive += sum(float(((vl[i] - el[i]) ** 2).sum().detach()) * (1 + beta) for i in range(5)) / 5
    assert loss.item() == pytest.approx(naive, rel=1e-5)
    loss.backward()
    # codebook term moves e only, commitment moves v only (scaled by beta)
    for vl, el in zip(v, e):
        assert torch.allclose(el.grad, 2 * (el - vl).detach() / 5, atol=1e-6)
        assert torch.allclose(vl.grad, 2 * beta * (vl - el).detach() / 5, atol=1e-6)


def test_straight_through_value_and_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3, requires_grad=True)
    out = straight_through(x, q)
    assert torch.allclose(out, q)
    w = torch.randn(4, 3)
    (out * w).sum().backward()
    assert torch.allclose(x.grad, w)
    assert q.grad is None


def test_residual_quantizer_matches_brute_force():
    torch.manual_seed(1)
    rq = ResidualQuantizer([5, 7, 3], dim=4, beta=0.25)
    r = torch.randn(11, 4, requires_grad=True)
    out = rq(r)
    residual, total = r.detach().clone(), torch.zeros(11, 4)
    for level, C in enumerate(rq.codebooks()):
        c = brute_nearest(residual, C.detach())
        assert torch.equal(out.codes[:, level], c)
        total += C.detach()[c]
        residual = residual - C.detach()[c]
    assert out.codes.shape == (11, 3)
    assert torch.allclose(out.quantized, total, atol=1e-6)
    naive = sum(((out.inputs[l].detach() - rq.codebooks()[l].detach()[out.codes[:, l]]) ** 2).sum(1).mean() * 1.25
                for l in range(3))
    assert out.loss.item() == pytest.approx(naive.item(), rel=1e-5)
    # STE: the decoder-side gradient reaches the encoder output unchanged
    w = torch.randn(11, 4)
    (out.quantized * w).sum().backward()
    assert torch.allclose(r.grad, w)


def test_kmeans_recovers_separated_clusters_and_handles_few_points():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centers])
    found = kmeans(x, 4, iters=20, generator=g)
    dist = torch.cdist(centers, found)
    assert dist.min(1).values.max() < 0.2          # every true centre has a centroid next to it
    assert set(dist.argmin(1).tolist()) == {0, 1, 2, 3}
    few = kmeans(x[:3], 5, generator=g)            # fewer points than clusters: centroids stay on the data
    assert few.shape == (5, 2)
    assert torch.cdist(few, x[:3]).min(1).values.max() < 1e-5
    with pytest.raises(ValueError):
        kmeans(torch.zeros(0, 2), 3)


def test_kmeans_init_levels_follow_residuals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    rq = ResidualQuantizer([8, 8], dim=6)
    before = rq(x).loss.item()
    rq.init_from_data(x, torch.Generator().manual_seed(3))
    assert bool(rq.initialised)
    expect0 = kmeans(x, 8, iters=rq.kmeans_iters, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(rq.codebook(0).detach(), expect0, atol=1e-5)
    # level 2 centroids are means of level-1 residuals: they average to ~0 weighted by counts
    c0 = brute_nearest(x, expect0)
    residual = x - expect0[c0]
    c1 = brute_nearest(residual, rq.codebook(1).detach())
    for k in c1.unique():
        assert torch.allclose(rq.codebook(1).detach()[k], residual[c1 == k].mean(0), atol=1e-4)
    assert rq(x).loss.item() < before


def test_dead_code_restart_reseeds_from_recent_residuals_and_resets_moments():
    torch.manual_seed(0)
    rq = ResidualQuantizer([4], dim=2, dead_code_steps=2)
    with torch.no_grad():
        rq.codebook(0).copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
    opt = torch.optim.Adam(rq.parameters(), lr=1e-2)
    x = torch.rand(16, 2)                      # only codes 0 and 1 are ever nearest
    for step in range(2):
        rq.train()
        out = rq(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        n = rq.restart_dead_codes(opt, torch.Generator().manual_seed(step))
        assert n == (0 if step == 0 else 2)
    books = rq.codebook(0).detach()
    for k in (2, 3):                           # re-seeded rows are residuals of the last batch
        assert torch.cdist(books[k:k + 1], x).min() < 1e-6
    assert torch.equal(rq.unused_0, torch.zeros(4, dtype=torch.long))
    state = opt.state[rq.codebook(0)]
    assert torch.count_nonzero(state["exp_avg"][2:]) == 0 and torch.count_nonzero(state["exp_avg_sq"][2:]) == 0
    assert torch.count_nonzero(state["exp_avg"][:2]) > 0
    rq.eval()                                  # no bookkeeping outside training
    rq(torch.full((3, 2), 50.0))
    assert torch.equal(rq.unused_0, torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- soft
def test_linear_tau_schedule():
    assert linear_tau(0, 100, 0.05, 0.001) == pytest.approx(0.05)
    assert linear_tau(100, 100, 0.05, 0.001) == pytest.approx(0.001)
    assert linear_tau(25, 100, 0.05, 0.001) == pytest.approx(0.05 - 0.25 * 0.049)
    assert linear_tau(500, 100, 0.05, 0.001) == pytest.approx(0.001)   # clamped after the last step
    assert linear_tau(3, 0, 0.05, 0.001) == pytest.approx(0.001)


def test_uniformity_loss_matches_formula():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(6, 5), 1), torch.softmax(torch.randn(6, 3), 1)]
    naive = 0.0
    for p in probs:
        for k in range(p.shape[1]):
            pb = sum(float(p[i, k]) for i in range(p.shape[0])) / p.shape[0]
            naive += pb * math.log(pb)
    assert uniformity_loss(probs).item() == pytest.approx(naive, rel=1e-5)
    uniform = [torch.full((4, 8), 1 / 8)]
    assert uniformity_loss(uniform).item() == pytest.approx(-math.log(8), rel=1e-6)   # the minimum
    collapsed = [torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 8).float()]
    assert uniformity_loss(collapsed).item() == pytest.approx(0.0, abs=1e-7)          # the maximum, finite
    p = collapsed[0].clone().requires_grad_(True)      # probabilities that underflowed to 0: finite gradient
    uniformity_loss([p]).backward()
    assert torch.isfinite(p.grad).all()


def test_soft_quantizer_matches_naive_soft_residuals():
    torch.manual_seed(2)
    sq = SoftResidualQuantizer([5, 4], dim=3)
    r = torch.randn(7, 3, requires_grad=True)
    tau = 0.7
    out = sq(r, tau)
    residual, total = r.detach().clone(), torch.zeros(7, 3)
    for level, C in enumerate(sq.codebooks()):
        C = C.detach()
        logits = torch.stack([-((residual - c) ** 2).sum(1) / tau for c in C], 1)
        p = torch.softmax(logits, 1)
        assert torch.allclose(out.probs[level], p, atol=1e-5)
        assert torch.equal(out.codes[:, level], p.argmax(1))
        q = p @ C
        total += q
        residual = residual - q                       # the residual continues with the soft vector
    assert torch.allclose(out.quantized, total, atol=1e-5)
    assert out.loss.item() == 0.0                     # no quantisation loss in soft pre-training
    out.quantized.pow(2).sum().backward()
    assert all(torch.count_nonzero(C.grad) > 0 for C in sq.codebooks())   # differentiable to the codebooks
    assert torch.count_nonzero(r.grad) > 0


def test_soft_quantizer_hard_codes_at_inference_are_nearest_along_soft_path():
    torch.manual_seed(3)
    sq = SoftResidualQuantizer([6, 6, 5], dim=4).eval()
    r = torch.randn(20, 4)
    codes, last = sq.last_level(r, 0.01)
    assert torch.equal(codes, sq(r, 0.01).codes)
    assert torch.equal(codes[:, -1], brute_nearest(last, sq.codebook(2).detach()))


# ----------------------------------------------------------------------------- tree
def test_prefix_residual_and_inverse_round_trip():
    h = torch.randn(5, 4, 3)
    inc = prefix_residual(h)
    assert torch.equal(inc[:, 0], h[:, 0])
    for l in range(1, 4):
        assert torch.allclose(inc[:, l], h[:, l] - h[:, l - 1])
    assert torch.allclose(inverse_prefix_residual(inc), h, atol=1e-6)


def test_tree_codes_and_code_loss_match_formulas():
    torch.manual_seed(4)
    tree = TreeCodebooks(num_levels=4, root_size=6, leaf_size=5, dim=3, beta=0.25)
    with torch.no_grad():
        tree.root_W.add_(0.1 * torch.randn(3, 3))
        tree.leaf_W.add_(0.1 * torch.randn(3, 3))
    h = torch.randn(9, 4, 3, requires_grad=True)
    out = tree(h)
    Cr = (tree.root_E @ tree.root_W).detach()
    Cf = (tree.leaf_E @ tree.leaf_W).detach()
    inc = prefix_residual(h.detach())
    assert torch.equal(out.codes[:, 0], brute_nearest(inc[:, 0], Cr))           # Eq. 4, l = 1
    for l in range(1, 4):
        assert torch.equal(out.codes[:, l], brute_nearest(inc[:, l], Cf))       # Eq. 4, l > 1, shared leaf
    q = torch.stack([Cr[out.codes[:, 0]]] + [Cf[out.codes[:, l]] for l in range(1, 4)], 1)
    # Eqs. 5-7 with the stop-gradients only changing gradients: value = (1 + beta) * squared error, per element
    lr = sum(((inc[i, 0] - q[i, 0]) ** 2).sum() * 1.25 for i in range(9)) / (9 * 3)
    lf = sum(((inc[i, l] - q[i, l]) ** 2).sum() * 1.25 for i in range(9) for l in range(1, 4)) / (9 * 3 * 3)
    assert out.loss.item() == pytest.approx(0.5 * (lr + lf).item(), rel=1e-5)
    assert code_loss(inc, q, 0.25).item() == pytest.approx(out.loss.item(), rel=1e-6)
    # inverse prefix residual of the quantised increments: h^_1 = e^r W^r, h^_l = h^_{l-1} + e^f W^f
    expect = torch.stack([q[:, :l + 1].sum(1) for l in range(4)], 1)
    assert torch.allclose(out.reconstruction, expect, atol=1e-5)
    assert torch.allclose(tree.decode(out.codes), expect, atol=1e-5)
    codes, last = tree.last_level(h.detach())
    assert torch.equal(codes, out.codes) and torch.allclose(last, inc[:, -1])


def test_tree_freeze_embeddings_trains_only_projections():
    torch.manual_seed(5)
    tree = TreeCodebooks(3, 4, 4, 2)
    h = torch.randn(8, 3, 2, requires_grad=True)
    tree(h).loss.backward()
    assert all(p.grad is not None for p in (tree.root_E, tree.leaf_E, tree.root_W, tree.leaf_W))
    tree.zero_grad(set_to_none=True)
    tree.freeze_embeddings()
    out = tree(h)
    (out.loss + out.reconstruction.sum()).backward()
    assert tree.root_E.grad is None and tree.leaf_E.grad is None
    assert tree.root_W.grad is not None and tree.leaf_W.grad is not None
    assert h.grad is not None                          # STE still reaches the encoder
    assert [n for n, p in tree.named_parameters() if p.requires_grad] == ["root_W", "leaf_W"]
    tree.freeze_embeddings(False)
    assert tree.root_E.requires_grad and tree.leaf_E.requires_grad


def test_tree_kmeans_init_and_bad_shapes():
    torch.manual_seed(6)
    tree = TreeCodebooks(3, 4, 6, 2)
    with torch.no_grad():
        tree.root_W.copy_(torch.tensor([[2.0, 0.5], [0.0, 1.0]]))
    h = torch.randn(40, 3, 2)
    before = tree(h).loss.item()
    tree.init_from_data(h, torch.Generator().manual_seed(0))
    inc = prefix_residual(h)
    expect = kmeans(inc[:, 0], 4, iters=tree.kmeans_iters, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tree.root_codebook().detach(), expect, atol=1e-4)   # E W = centroids for the current W
    assert tree(h).loss.item() < before
    with pytest.raises(ValueError, match="at least 2 levels"):
        TreeCodebooks(1, 4, 4, 2)
    with pytest.raises(ValueError, match="expected"):
        tree(torch.randn(3, 2, 2))
