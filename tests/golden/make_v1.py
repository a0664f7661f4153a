"""How tests/golden/v1 was made, once, by safeckpt 0.1 (format 1.0). Never regenerate it.

    python tests/golden/make_v1.py OUT     (refuses to write into an existing folder)

The checkpoint is committed so that every later version must still load it (tests/test_golden.py);
``expected.json`` records what it holds, computed from the state in memory when it was saved.
``GoldenLM`` is frozen with it: the test rebuilds it to load the weights into.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import torch


class GoldenLM(torch.nn.Module):
    """Embedding -> tanh MLP -> LayerNorm -> head tied to the embedding."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


def facts(t: torch.Tensor) -> dict[str, object]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "first": t.detach().reshape(-1)[:3].tolist()}


def main(out: Path) -> None:
    import safeckpt

    out.mkdir(parents=True, exist_ok=False)
    torch.manual_seed(1234)
    random.seed(1234)
    model = GoldenLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        tokens = torch.randint(0, 11, (3, 5), generator=gen)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 11), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.seen += 1
    config = {"vocab": 11, "dim": 6, "lr": 3e-3, "betas": [0.9, 0.95], "name": "golden-v1", "tied": True}
    vocab = ["<pad>", "<bos>", "a", "b", "c", "d", "e", "f", "g", "h", "\u00e9"]
    extra = {"loader": {"epoch": 0, "offset": 15, "order": (2, 0, 1)}, "ema": {"decay": 0.99, "shadow": model.hidden.weight.detach() * 0.5},
             "counters": {0: 3, 1: 9}, "tag": b"v1"}
    path = safeckpt.save_checkpoint(model, optimizer, config, vocab, 3, directory=out, scheduler=scheduler, extra=extra,
                                    metadata={"purpose": "golden checkpoint of format 1.0"})
    opt = optimizer.state_dict()
    expected = {
        "path": path.name,
        "step": 3,
        "config": config,
        "vocab": vocab,
        "metadata": {"purpose": "golden checkpoint of format 1.0"},
        "model": {name: facts(t) for name, t in model.state_dict().items()},
        "tied": [["head.weight", "embed.weight"]],
        "optimizer": {
            "param_groups": [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")} for g in opt["param_groups"]],
            "state": {str(pid): {k: facts(v) for k, v in s.items()} for pid, s in opt["state"].items()},
        },
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k in ("step_size", "gamma", "base_lrs", "last_epoch", "_last_lr")},
        "extra": {"loader": {"epoch": 0, "offset": 15, "order": [2, 0, 1]}, "ema_decay": 0.99,
                  "ema_shadow": facts(extra["ema"]["shadow"]), "counters": {"0": 3, "1": 9}, "tag_hex": "7631"},
        "last_loss": float(loss.detach()),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
