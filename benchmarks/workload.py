"""The benchmark state: a transformer-shaped stack of linear layers plus a stepped AdamW.

``build_state(nbytes)`` returns a model and optimizer whose parameters and optimizer state
together take about ``nbytes`` bytes (parameters are a third: AdamW keeps ``exp_avg`` and
``exp_avg_sq`` of the same size), with realistic tensor counts (a few per block).
"""

from __future__ import annotations

import torch

__all__ = ["build_state", "sharded_state", "state_nbytes"]


class Block(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)


class Model(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, blocks: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(blocks))
        self.head = torch.nn.Linear(dim, vocab, bias=False)


def state_nbytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every parameter, buffer and optimizer-state tensor."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for per_param in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def build_state(
    nbytes: int, *, init_optimizer: bool = True, seed: int = 0
) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """A model and AdamW of about ``nbytes`` in total; with ``init_optimizer`` the optimizer has
    taken one step (so it holds its full state), otherwise it is fresh (as when resuming)."""
    dim = 256 if nbytes < 50e6 else 512 if nbytes < 500e6 else 1024 if nbytes < 4e9 else 2048
    params = nbytes / 12  # float32 parameter + two float32 AdamW moments
    vocab = 4 * dim
    blocks = max(1, round((params - 2 * vocab * dim) / (4 * dim * dim)))
    torch.manual_seed(seed)
    with torch.no_grad():
        model = Model(vocab, dim, blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if init_optimizer:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return model, optimizer, state_nbytes(model, optimizer)
    return model, optimizer, 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def sharded_state(mb: int, world: int) -> dict[str, object]:
    """DCP's state dict (``model``, ``optim``) of an FSDP2 model of about ``mb`` MB in total over
    ``world`` ranks of a CPU mesh (each block ``fully_shard``-ed), whose AdamW has taken one
    step; called on every rank of an initialised gloo group."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    dim = 1024
    params = mb * 1e6 / 12
    blocks = max(1, round((params - 2 * 4 * dim * dim) / (4 * dim * dim)))
    torch.manual_seed(0)
    model = Model(4 * dim, dim, blocks)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}
