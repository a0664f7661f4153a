"""Bit-exact resume on CPU, proved with check_resume, and exact round-trips of every LR scheduler.

The GradScaler case runs the real ``torch.amp.GradScaler("cpu")`` (it works on CPU in the torch
we pin) inside CPU autocast with bfloat16, so both the scaler's state and the autocast path are
covered.
"""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.optim import lr_scheduler as L

import safeckpt
from ckpt_tools import assert_same_state
from safeckpt import TrainState, check_resume
from safeckpt.demo.corpus import generate_corpus
from safeckpt.demo.data import ShuffledBatches
from safeckpt.demo.model import CharTransformer, ModelConfig

# -- loops ----------------------------------------------------------------------------------


def _demo_state() -> TrainState:
    torch.manual_seed(0)
    text = generate_corpus(6 * 1024)
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.uint8)
    model = CharTransformer(ModelConfig(len(vocab), seq_len=16, d_model=16, n_layers=1, n_heads=2, dropout=0.2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = L.SequentialLR(opt, [L.LinearLR(opt, 0.1, total_iters=3), L.CosineAnnealingLR(opt, 10)], [3])
    # 6 KiB / 16 chars = 383 windows = 47 batches of 8: a short epoch, so the run crosses it
    batches = ShuffledBatches(data, seq_len=16, batch_size=8, seed=1)
    batches.batches_per_epoch = 4
    return TrainState(model, opt, sched, extra={"data": batches})


def _demo_step(state: TrainState, step: int) -> torch.Tensor:
    inputs, targets = state.extra["data"].next()  # type: ignore[attr-defined]
    loss = state.model.loss(inputs, targets)  # type: ignore[operator]
    assert state.optimizer is not None
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()  # type: ignore[attr-defined]
    return loss


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )


def _mlp_loss(model: torch.nn.Module) -> torch.Tensor:
    inputs, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def _plain_step(state: TrainState, step: int) -> torch.Tensor:
    assert state.optimizer is not None
    state.optimizer.zero_grad()
    loss = _mlp_loss(state.model)
    loss.backward()
    state.optimizer.step()
    if isinstance(state.scheduler, L.ReduceLROnPlateau):
        state.scheduler.step(float(loss.detach()) + step)  # rising "validation loss": the LR must drop
    elif state.scheduler is not None:
        state.scheduler.step()  # type: ignore[attr-defined]
    return loss


def _sgd_steplr() -> TrainState:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return TrainState(model, opt, L.StepLR(opt, step_size=3, gamma=0.5))


def _adamw_onecycle() -> TrainState:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(model, opt, L.OneCycleLR(opt, max_lr=0.05, total_steps=12))


def _amsgrad_plateau() -> TrainState:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    return TrainState(model, opt, L.ReduceLROnPlateau(opt, patience=1, factor=0.5))


def _scaler_state() -> TrainState:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return TrainState(model, opt, L.ExponentialLR(opt, 0.9), extra={"scaler": scaler})


def _scaler_step(state: TrainState, step: int) -> torch.Tensor:
    scaler: torch.amp.GradScaler = state.extra["scaler"]  # type: ignore[assignment]
    assert state.optimizer is not None
    state.optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _mlp_loss(state.model)
    scaler.scale(loss).backward()
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()  # type: ignore[attr-defined]
    return loss


LOOPS: dict[str, tuple[Callable[[], TrainState], Callable[[TrainState, int], object]]] = {
    "demo-model-dropout-adamw-sequentiallr-sampler": (_demo_state, _demo_step),
    "sgd-momentum-steplr": (_sgd_steplr, _plain_step),
    "adamw-onecyclelr": (_adamw_onecycle, _plain_step),
    "adam-amsgrad-reducelronplateau": (_amsgrad_plateau, _plain_step),
    "gradscaler-cpu-autocast-bf16": (_scaler_state, _scaler_step),
}


@pytest.mark.parametrize("resume_at", [1, 5])
@pytest.mark.parametrize("loop", LOOPS)
def test_resume_is_bit_exact(loop: str, resume_at: int) -> None:
    make_state, train_step = LOOPS[loop]
    report = check_resume(make_state, train_step, steps=10, resume_at=resume_at)
    assert report.ok, str(report)
    assert report.resumed_losses == report.reference_losses and len(report.reference_losses) == 10
    assert "identical" in str(report)


def test_the_loops_really_change_lr_and_scale() -> None:
    """The schedules and the scaler must move within the checked steps, or the checks prove little."""
    for make_state, train_step in LOOPS.values():
        state = make_state()
        assert state.optimizer is not None
        lrs = []
        for step in range(10):
            train_step(state, step)
            lrs.append(state.optimizer.param_groups[0]["lr"])
        assert len(set(lrs)) > 1
    state = _scaler_state()
    scales = []
    for step in range(6):
        _scaler_step(state, step)
        scales.append(state.extra["scaler"].get_scale())  # type: ignore[attr-defined]
    assert len(set(scales)) > 1


def test_check_resume_restores_the_callers_rng() -> None:
    torch.manual_seed(11)
    random.seed(11)
    expected = (torch.rand(2), random.random())
    torch.manual_seed(11)
    random.seed(11)
    check_resume(_sgd_steplr, _plain_step, steps=3)
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]


# -- check_resume finds what is wrong ----------------------------------------------------------


def test_reports_a_generator_the_checkpoint_does_not_hold() -> None:
    def make() -> TrainState:
        state = _sgd_steplr()
        state.model.data_gen = torch.Generator().manual_seed(0)  # type: ignore[assignment]
        return state

    def step(state: TrainState, index: int) -> torch.Tensor:
        noise = torch.randn(1, generator=state.model.data_gen)  # type: ignore[arg-type]
        return _plain_step(state, index) + noise

    report = check_resume(make, step, steps=6, resume_at=3)
    assert not report.ok and report.divergence is not None
    assert report.divergence.step == 3 and report.divergence.name == "loss"
    assert report.divergence.max_abs_diff > 0 and "not in TrainState" in report.divergence.reason
    assert report.resumed_losses[:3] == report.reference_losses[:3]

    def make_declared() -> TrainState:
        state = make()
        state.generators["data"] = state.model.data_gen
        return state

    assert check_resume(make_declared, step, steps=6, resume_at=3).ok


class _Forgetful:
    """Counts steps; its load_state_dict forgets to restore: the bug check_resume must catch."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def _with_forgetful() -> TrainState:
    state = _sgd_steplr()
    state.extra["counter"] = _Forgetful()
    return state


def _counting_step(state: TrainState, index: int) -> torch.Tensor:
    state.extra["counter"].count += 1  # type: ignore[attr-defined]
    return _plain_step(state, index)


def test_reports_state_the_load_does_not_restore() -> None:
    report = check_resume(_with_forgetful, _counting_step, steps=6, resume_at=4)
    assert report.divergence is not None
    assert (report.divergence.step, report.divergence.name) == (3, "extra['counter']['count']")
    assert report.divergence.max_abs_diff == 4.0 and "right after loading" in report.divergence.reason
    assert "diverged at step 3" in str(report)


def test_atol_tolerates_small_differences() -> None:
    # the counter stays 4 behind; everything else is exact
    assert check_resume(_with_forgetful, _counting_step, steps=6, resume_at=4, atol=4.0).ok
    assert not check_resume(_with_forgetful, _counting_step, steps=6, resume_at=4, atol=3.5).ok


def test_reports_a_scheduler_left_out_of_the_state() -> None:
    def make() -> TrainState:
        state = _sgd_steplr()
        state.model.sched = state.scheduler  # type: ignore[assignment]
        state.scheduler = None
        return state

    def step(state: TrainState, index: int) -> torch.Tensor:
        loss = _plain_step(state, index)
        state.model.sched.step()  # type: ignore[operator]
        return loss

    report = check_resume(make, step, steps=8, resume_at=2)
    assert report.divergence is not None and report.divergence.step >= 2
    assert "lr" in report.divergence.name or report.divergence.name == "loss"


def test_reports_a_loop_that_is_not_deterministic() -> None:
    def step(state: TrainState, index: int) -> torch.Tensor:
        return _plain_step(state, index) + random.Random().random()  # unseeded: differs every run

    report = check_resume(_sgd_steplr, step, steps=4, resume_at=2)
    assert report.divergence is not None and report.divergence.step == 1
    assert "not deterministic" in report.divergence.reason


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 1}, "steps must be an int >= 2"),
    ({"steps": 4, "resume_at": 4}, r"resume_at must be an int in \[1, 3\]"),
    ({"steps": 4, "resume_at": 0}, "resume_at"),
])
def test_check_resume_rejects_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_resume(_sgd_steplr, _plain_step, **kwargs)


# -- every scheduler class round-trips exactly -------------------------------------------------


def _opt() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1, momentum=0.9)


class _Warmup:
    """A picklable-style callable object: LambdaLR saves its __dict__."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "LambdaLR": lambda o: L.LambdaLR(o, [lambda e: 0.9**e, _Warmup(4)]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 5, 5, 8], gamma=0.5),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=5),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, total_iters=3), L.MultiStepLR(o, [4, 6])], [3]),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=7, eta_min=0.001),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.StepLR(o, 3, 0.5), L.ExponentialLR(o, 0.95)]),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5, cooldown=1),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, mode="exp_range", gamma=0.9),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-4),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[0.2, 0.1], total_steps=20, three_phase=True),
}


def test_every_scheduler_class_is_covered() -> None:
    classes = {
        name for name, obj in vars(L).items()
        if inspect.isclass(obj) and issubclass(obj, (L.LRScheduler, L.ReduceLROnPlateau))
        and not name.startswith("_") and obj is not L.LRScheduler
    }
    assert classes <= set(SCHEDULERS), f"add a factory for {sorted(classes - set(SCHEDULERS))}"


def _advance(opt: torch.optim.Optimizer, sched: object, count: int, start: int) -> list[list[float]]:
    lrs = []
    for index in range(start, start + count):
        opt.step()
        if isinstance(sched, L.ReduceLROnPlateau):
            sched.step(1.0 + (index % 3 == 0))  # plateaus and improvements
        else:
            sched.step()  # type: ignore[attr-defined]
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_round_trips_exactly(name: str, tmp_path: object) -> None:
    opt = _opt()
    sched = SCHEDULERS[name](opt)
    _advance(opt, sched, 5, 0)
    path = safeckpt.save_checkpoint({}, opt, None, None, 5, directory=tmp_path, scheduler=sched, rng=False)  # type: ignore[arg-type]

    opt2 = _opt()
    sched2 = SCHEDULERS[name](opt2)
    safeckpt.load_checkpoint(path, optimizer=opt2, scheduler=sched2, restore_rng=False)
    assert_same_state(sched2.state_dict(), sched.state_dict())  # type: ignore[attr-defined]
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert _advance(opt2, sched2, 9, 5) == _advance(opt, sched, 9, 5)


def test_multisteplr_milestones_come_back_as_a_counter(tmp_path: object) -> None:
    opt = _opt()
    sched = L.MultiStepLR(opt, milestones=[2, 4, 4])
    path = safeckpt.save_checkpoint({}, opt, None, None, 0, directory=tmp_path, scheduler=sched, rng=False)  # type: ignore[arg-type]
    opt2 = _opt()
    sched2 = L.MultiStepLR(opt2, milestones=[9])
    safeckpt.load_checkpoint(path, optimizer=opt2, scheduler=sched2, restore_rng=False)
    assert sched2.milestones == Counter({2: 1, 4: 2}) and isinstance(sched2.milestones, Counter)
    opt2.step()
    with pytest.warns(UserWarning, match="epoch"):  # the closed form uses Counter.elements()
        sched2.step(5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**3)


def test_demo_report_and_check_resume_share_one_nan_aware_difference(tmp_path: Path) -> None:
    from safeckpt.demo.report import compare_final

    model = torch.nn.Linear(2, 2)
    first = safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path / "a", rng=False)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    second = safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path / "b", rng=False)
    diff, where = compare_final(first, second)["parameters"]
    assert diff == math.inf and where == "weight"  # a NaN on one side is never "0 difference"
    assert compare_final(second, second)["parameters"] == (0.0, "")  # NaN against NaN is equal
