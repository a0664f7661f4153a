"""Every torch.optim optimizer round-trips after real steps and then continues identically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM, train_steps

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "AdamW-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=4, max_iter=3),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_round_trips_and_continues_identically(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = OPTIMIZERS[name](model.parameters())
    train_steps(model, opt, 3, seed=1)
    safeckpt.save_checkpoint(model, opt, None, None, 3, directory=tmp_path)
    expected = train_steps(model, opt, 3, seed=2)

    torch.manual_seed(99)
    fresh = TinyLM()
    fresh_opt = OPTIMIZERS[name](fresh.parameters())
    safeckpt.load_checkpoint(tmp_path, model=fresh, optimizer=fresh_opt)
    assert train_steps(fresh, fresh_opt, 3, seed=2) == expected
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_optimizer_with_param_groups_and_tensor_lr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    groups = [
        {"params": [model.embed.weight], "lr": torch.tensor(0.01)},
        {"params": list(model.hidden.parameters()) + list(model.norm.parameters()), "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    train_steps(model, opt, 2)
    safeckpt.save_checkpoint(model, opt, None, None, 2, directory=tmp_path)
    fresh_groups = [
        {"params": [model.embed.weight], "lr": torch.tensor(0.5)},
        {"params": list(model.hidden.parameters()) + list(model.norm.parameters()), "weight_decay": 0.0},
    ]
    fresh_opt = torch.optim.AdamW(fresh_groups, lr=1e-3)
    safeckpt.load_checkpoint(tmp_path, optimizer=fresh_opt)
    assert float(fresh_opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert fresh_opt.param_groups[1]["weight_decay"] == 0.0
