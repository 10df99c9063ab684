"""Per-part LR schedules (engine.deepspeed_setup.PartClocks): a part's warmup + cosine spans its own steps
and advances only while its gate is open; a resumed schedule continues exactly; ETEGRec's sides use it."""
from __future__ import annotations

import torch

from megarec.engine.deepspeed_setup import PartClocks, WarmupCosine, warmup_cosine


def optimizer() -> torch.optim.Optimizer:
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    return torch.optim.SGD([{"params": [a], "name": "decay", "lr": 1.0},
                            {"params": [b], "name": "tokenizer.decay", "lr": 0.1},
                            {"params": [c], "name": "other", "lr": 1.0}], lr=1.0)


def run(clocks: PartClocks, opt, epochs: range, steps: int, gates: dict, log: list) -> None:
    sched = clocks.scheduler(opt) if not hasattr(opt, "_sched") else opt._sched
    opt._sched = sched
    for e in epochs:
        tok = e % 2 == 0                          # alternating: even epochs train the tokenizer
        gates.clear()
        gates.update({"decay": 0.0 if tok else 1.0, "tokenizer.": 1.0 if tok else 0.0})
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)          # as refresh_lr after an epoch hook
        for _ in range(steps):
            log.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()


def test_each_part_follows_its_own_schedule_over_its_own_steps():
    gates: dict = {}
    sched = WarmupCosine(warmup_steps=2, total_steps=40, min_ratio=0.0)
    clocks = PartClocks(sched, {"decay": 20, "tokenizer.": 20}, gates)
    log: list = []
    run(clocks, optimizer(), range(4), 10, gates, log)
    rec = [lr[0] for lr in log]
    tok = [lr[1] for lr in log]
    # epoch 1 (the recommender's first): its schedule starts at its own step 0, not decayed by epoch 0
    assert rec[:10] == [0.0] * 10
    assert rec[10:20] == [warmup_cosine(k, 2, 20) for k in range(10)]
    assert rec[30:40] == [warmup_cosine(k, 2, 20) for k in range(10, 20)]
    assert tok[:10] == [0.1 * warmup_cosine(k, 2, 20) for k in range(10)] and tok[10:20] == [0.0] * 10
    assert tok[20:30] == [0.1 * warmup_cosine(k, 2, 20) for k in range(10, 20)]
    # a group of no part follows the run's schedule over every step
    assert [lr[2] for lr in log] == [sched(k) for k in range(40)]
    assert clocks.state_dict() == {"counts": {"decay": 20, "tokenizer.": 20}, "last_step": 40}


def test_a_resumed_schedule_continues_exactly():
    gates: dict = {}
    full: list = []
    run(PartClocks(WarmupCosine(2, 40), {"decay": 20, "tokenizer.": 20}, gates), optimizer(), range(4), 10, gates,
        full)
    first: list = []
    clocks = PartClocks(WarmupCosine(2, 40), {"decay": 20, "tokenizer.": 20}, gates)
    opt = optimizer()
    run(clocks, opt, range(3), 10, gates, first)
    saved, sched_state = clocks.state_dict(), opt._sched.state_dict()
    again = PartClocks(WarmupCosine(2, 40), {"decay": 20, "tokenizer.": 20}, gates)
    opt2 = optimizer()
    opt2._sched = again.scheduler(opt2)
    opt2._sched.load_state_dict(sched_state)
    again.load_state_dict(saved)
    rest: list = []
    run(again, opt2, range(3, 4), 10, gates, rest)
    assert first + rest == full


def test_etegrec_sides_count_their_own_epochs():
    from megarec.methods.etegrec.plugin import ETEGRecConfig, part_epochs

    s = ETEGRecConfig(cycle=4)
    assert part_epochs(s, 40) == {"tokenizer.": 10, "decay": 30, "no_decay": 30}
    assert part_epochs(ETEGRecConfig(alternate=False), 8) == {"tokenizer.": 8, "decay": 8, "no_decay": 8}
    assert part_epochs(ETEGRecConfig(cycle=2, finetune_epochs=2), 6) == {"tokenizer.": 2, "decay": 4, "no_decay": 4}
