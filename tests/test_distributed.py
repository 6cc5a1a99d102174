"""DDP (with a switch to low rank mid-run and a re-wrap) and FSDP2, two gloo processes on CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, LowRankLinear, switch_to_lowrank

WORLD = 2


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        AdaptiveLowRankLinear(32, 64, rank=8),
        nn.ReLU(),
        AdaptiveLowRankLinear(64, 64, rank=8),
        nn.ReLU(),
        nn.Linear(64, 4),
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _all_equal_across_ranks(model: nn.Module) -> bool:
    for p in model.parameters():
        gathered = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(gathered, p.detach().contiguous())
        if not all(torch.equal(gathered[0], t) for t in gathered[1:]):
            return False
    return True


def _ddp_worker(rank: int, init_file: str, results) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, init_file)
    try:
        model = make_model()
        ddp = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(8):
            if step == 4:
                # the re-wrap pattern: switch the bare module (same factors on every rank:
                # identical weights, deterministic SVD), keep the optimizer, wrap again
                switch_to_lowrank(model, opt)
                ddp = DDP(model)
            x, y = batch(step, rank)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if not _all_equal_across_ranks(model):
                raise AssertionError(f"parameters differ across ranks after step {step}")
        results[rank] = (
            losses,
            model[0].is_lowrank,
            [p.shape for p in opt.param_groups[0]["params"]],
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_switch_and_rewrap(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        losses, switched, shapes = results[rank]
        assert switched and len(losses) == 8
        assert torch.Size([64, 8]) in shapes  # the factors are in the optimizer


def _fsdp_worker(rank: int, init_file: str, results) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(LowRankLinear(32, 64, 8), nn.ReLU(), LowRankLinear(64, 4, 4))
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            x, y = batch(step, rank)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        results[rank] = full
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_matches_a_single_process_run(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    # the same steps in one process: each step's gradient is the mean over the ranks' batches
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(32, 64, 8), nn.ReLU(), LowRankLinear(64, 4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        for rank in range(WORLD):
            x, y = batch(step, rank)
            (nn.functional.cross_entropy(model(x), y) / WORLD).backward()
        opt.step()
    for rank in range(WORLD):
        for key, value in model.state_dict().items():
            assert torch.allclose(results[rank][key], value, atol=1e-6), (rank, key)
