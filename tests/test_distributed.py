"""DDP and FSDP2 (fully_shard) over a model built on fastattn ops: two gloo processes on the CPU
(the kernels under Triton's interpreter) train to the same weights as one process on the whole
batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastattn.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=32)
STEPS = 3


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 61, (4, 12), generator=g) for _ in range(STEPS)]


def _model():
    torch.manual_seed(0)
    return GPT(CONFIG)


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for ids in batches:
        ids = ids.chunk(world)[rank]  # this process's share of the batch
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
        opt.zero_grad()
        model(ids, targets=targets)[1].backward()
        opt.step()


def _worker(rank, world, init_file, wrap, out_file):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = _model()
        if wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
            _train(model, _batches(), rank, world)
            state = model.module.state_dict()
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            _train(model, _batches(), rank, world)
            state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out_file)
        dist.barrier()  # both done before either tears gloo down (a teardown race aborted one)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_two_processes_train_to_the_single_process_weights(wrap, device):
    if device != "cpu":
        pytest.skip("the gloo test runs on the CPU (interpreter); GPUs run it with NCCL elsewhere")
    single = _model()
    _train(single, _batches())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "state.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), wrap, out), nprocs=2, join=True)
        state = torch.load(out)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
