"""Shared fixtures: a small model, a trained optimizer, a saved checkpoint, and an S3 API server
(moto, on loopback) with a fresh bucket."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import safeckpt

if TYPE_CHECKING:
    from s3_server import S3Server


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> output head tied to the embedding (no dropout: deterministic)."""

    def __init__(self, vocab: int = 17, dim: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, *, seed: int = 0) -> list[float]:
    """A few real optimisation steps on fixed random batches; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 17, (4, 6), generator=gen)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 17), tokens[:, 1:].reshape(-1))
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture
def model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def optimizer(model: TinyLM) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    return opt


@pytest.fixture
def saved(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> Path:
    """A committed checkpoint at step 3 with config, vocab and extra state."""
    return safeckpt.save_checkpoint(
        model,
        optimizer,
        {"lr": 1e-2, "layers": 1, "name": "tiny"},
        [chr(97 + i) for i in range(17)],
        3,
        directory=tmp_path / "checkpoints",
        extra={"loader": {"epoch": 1, "offset": 12}},
    )


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    """moto's S3 API on a free loopback port, for one test module (moto is imported only here,
    so that test modules without object storage do not need it)."""
    from s3_server import S3Server

    s3 = S3Server()
    s3.start()
    yield s3
    s3.stop()


@pytest.fixture()
def bucket(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on ``server``; dummy credentials in the environment, as s3fs reads them."""
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket=name)
    return name


def spy_everywhere(monkeypatch: pytest.MonkeyPatch, function: Callable[..., object], calls: list[tuple[str, dict]]) -> None:
    """Replace ``function`` in every safeckpt module that imported it by a recording wrapper."""

    def spy(*args: object, **kwargs: object) -> object:
        calls.append((function.__qualname__, dict(kwargs)))
        return function(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name == "safeckpt" or name.startswith("safeckpt.")]:
        for attribute, value in list(vars(module).items()):
            if value is function:
                monkeypatch.setattr(module, attribute, spy)


@pytest.fixture
def parser_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict]]]:
    import msgpack

    import safeckpt.torch.loader  # every module that imports a parser must be loaded before spying
    import safeckpt.torch.tensors
    from safeckpt.format import documents, tree
    from safeckpt.format import safetensors as archive

    calls: list[tuple[str, dict]] = []
    for function in (
        archive.parse_header,
        documents.load_json,
        documents.load_msgpack,
        tree.decode_document,
        safeckpt.torch.tensors.tensors_from_buffer,
    ):
        spy_everywhere(monkeypatch, function, calls)
    real_unpackb = msgpack.unpackb

    def unpackb(*args: object, **kwargs: object) -> object:
        calls.append(("msgpack.unpackb", {}))
        return real_unpackb(*args, **kwargs)

    monkeypatch.setattr(msgpack, "unpackb", unpackb)
    yield calls
