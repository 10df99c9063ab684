"""k-means init and dead-code restarts under a real DeepSpeed ZeRO-3 engine on 2 CPU ranks."""
import torch

from megarec.tokenizer import ResidualQuantizer, kmeans
from tests.dist import run_ranks


class _Loss(torch.nn.Module):
    def __init__(self, rq: ResidualQuantizer):
        super().__init__()
        self.rq = rq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rq(x)
        return out.loss + out.quantized.pow(2).sum(1).mean()


def rank_data(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(24, 3, generator=g) + 4.0 * rank       # the ranks see different data


def _zero3_rank(rank: int, world: int):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rq = ResidualQuantizer([6, 5], dim=3, dead_code_steps=2, kmeans_iters=10)
    model = _Loss(rq)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                                      config=cfg)
    partitioned = all(hasattr(p, "ds_id") and p.data.numel() < p.ds_numel for p in rq.codebooks())
    x = rank_data(rank)
    rq.init_from_data(x, torch.Generator().manual_seed(7))
    after_init = rq.full_codebooks()
    restarted = 0
    for _ in range(3):                  # a narrow batch: most codes go unused and are restarted
        loss = engine(x[:3])
        engine.backward(loss)
        engine.step()
        restarted += rq.restart_dead_codes(generator=torch.Generator().manual_seed(rank))
    after_restart = rq.full_codebooks()
    master = [safe_get_full_fp32_param(p).clone() for p in rq.codebooks()]
    loss = engine(x[:3])                # the optimizer keeps the restarted rows: lr 0 step changes nothing
    engine.backward(loss)
    for group in engine.optimizer.optimizer.param_groups:
        group["lr"] = 0.0
    engine.step()
    after_step = rq.full_codebooks()
    as_np = lambda books: [b.detach().cpu().numpy() for b in books]  # tensors would travel as shared-memory fds
    return partitioned, as_np(after_init), as_np(after_restart), as_np(master), as_np(after_step), restarted


def test_init_and_restart_leave_identical_codebooks_on_every_rank():
    r0, r1 = ([x if not isinstance(x, list) else [torch.from_numpy(b) for b in x] for x in r]
              for r in run_ranks(_zero3_rank, world_size=2, timeout=240))
    assert r0[0] and r1[0], "ZeRO-3 did not partition the codebooks"
    assert r0[5] == r1[5] and r0[5] > 0                       # same dead set on both ranks, something restarted
    for a, b in zip(r0[1] + r0[2] + r0[4], r1[1] + r1[2] + r1[4]):
        assert torch.equal(a, b)
    # k-means ran on the samples of BOTH ranks
    expect = kmeans(torch.cat([rank_data(0), rank_data(1)]), 6, iters=10, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(r0[1][0], expect, atol=1e-5)
    assert not torch.allclose(r0[2][0], r0[1][0])              # restarts changed level-1 codes
    for book, master, stepped in zip(r0[2], r0[3], r0[4]):     # fp32 master copy = the visible parameter
        assert torch.allclose(book, master.to(book)) and torch.allclose(book, stepped)


def _frozen_tree_rank(rank: int, world: int):
    """Fine-tuning under ZeRO-3: E frozen (no optimizer state), W trained, dead rows of E re-seeded."""
    import deepspeed

    from megarec.tokenizer.tree import TreeCodebooks
    from megarec.tokenizer.zero import full_param

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tree = TreeCodebooks(2, 6, 5, 3, dead_code_steps=2)
    tree.freeze_embeddings()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    params = [p for p in tree.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=tree, optimizer=torch.optim.Adam(params, lr=0.05), config=cfg)
    partitioned = hasattr(tree.root_E, "ds_id") and tree.root_E.data.numel() < tree.root_E.ds_numel
    x = torch.stack([rank_data(rank)[:3]] * 2, dim=1)        # [3 items, 2 levels, 3]: a narrow batch
    before = full_param(tree.root_E)
    per_step, restarted = [], 0
    for _ in range(3):
        out = engine(x)
        per_step.append(sorted(set(out.codes[:, 0].tolist())))
        engine.backward(out.loss)
        engine.step()
        restarted += tree.restart_dead_codes(generator=torch.Generator().manual_seed(rank))
    after = full_param(tree.root_E)
    return partitioned, per_step, before.numpy(), after.numpy(), restarted


def test_restarts_of_a_frozen_codebook_under_zero3():
    r0, r1 = run_ranks(_frozen_tree_rank, world_size=2, timeout=240)
    assert r0[0] and r1[0], "ZeRO-3 did not partition the codebooks"
    assert r0[4] == r1[4] and r0[4] > 0                       # the same dead rows re-seeded on both ranks
    assert (r0[3] == r1[3]).all()                             # one E on both ranks afterwards
    changed = {i for i in range(6) if not (r0[2][i] == r0[3][i]).all()}
    always_used = set.intersection(*(set(a) | set(b) for a, b in zip(r0[1], r1[1])))
    assert changed and always_used and not changed & always_used   # rows in use keep their pre-trained values
