"""A lorakit model under torch's DistributedDataParallel and FSDP2 (``fully_shard``), gloo, two CPU processes: each
rank's adapter gradients are the average of both ranks', as one process computing both batches gets them."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorakit
from lorakit_testing import make_tiny_llama

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _model(worker=False):
    model = make_tiny_llama(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    if worker:  # as lorakit's loops (malloc kept, adapter gradients into kept memory), with oneDNN routing
        lorakit.accelerate(model, lorakit.cpu.CpuSettings(onednn="on", threads=1))
    return model


def _batch(rank):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))


def _grads(model):
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g.clone()  # noqa: E731  (FSDP2: DTensor shards)
    return {n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, out_dir, wrapper):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model(worker=True)
        if wrapper == "ddp":
            run = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.model.layers:
                fully_shard(layer)
            run = fully_shard(model)
        ids = _batch(rank)
        run(input_ids=ids, labels=ids).loss.backward()
        torch.save(_grads(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: there gloo's background threads abort the process now and then ("terminate
    # called without an active exception"; 2 in 10 torchrun runs of a plain nn.Linear under DDP here, none with this)
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_adapter_gradients_are_averaged_across_ranks(tmp_path, wrapper):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), wrapper), nprocs=2, start_method="spawn")
    model = _model()
    for rank in (0, 1):
        ids = _batch(rank)
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    want = _grads(model)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == want.keys() and got
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
