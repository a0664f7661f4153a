"""Shuffled mini-batches whose position in the data stream can be saved and restored exactly.

The text is cut into ``num_windows`` non-overlapping windows of ``seq_len + 1`` characters.
Each epoch serves them in a fresh random order, ``batch_size`` at a time (the incomplete last
batch is dropped). The *data position* is three things, and :meth:`ShuffledBatches.state_dict`
saves exactly them:

``epoch``
    how many full passes over the data were completed;
``offset``
    how many batches of the current epoch were already served;
``generator``
    the state of the sampler's own ``torch.Generator`` *at the start of the epoch*, from which
    the epoch's order (``torch.randperm``) is drawn again on restore.

Storing the generator state rather than the permutation keeps the state a few KB for any data
size; storing the state at the start of the epoch, not the current one, is what lets the same
order be rebuilt. Pass the sampler in ``extra=`` when saving and restoring (it has
``state_dict`` / ``load_state_dict``), and resume the loop at ``checkpoint.step + 1``.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointMismatchError

__all__ = ["ShuffledBatches"]


class ShuffledBatches:
    """Endless epoch-wise shuffled batches ``(inputs, targets)`` of shape ``[batch, seq_len]``.

    Example:
        >>> batches = ShuffledBatches(data, seq_len=64, batch_size=16, seed=0)  # doctest: +SKIP
        >>> x, y = batches.next()  # doctest: +SKIP
        >>> mgr.save(step, model=model, extra={"data": batches})  # doctest: +SKIP
    """

    def __init__(self, data: torch.Tensor, *, seq_len: int, batch_size: int, seed: int) -> None:
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.windows = data[: (len(data) - 1) // seq_len * seq_len + 1]
        self.num_windows = (len(data) - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(f"{len(data)} tokens make {self.num_windows} windows, fewer than one batch of {batch_size}")
        self.batches_per_epoch = self.num_windows // batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.offset = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_start_state = self.generator.get_state()
        self._order = torch.randperm(self.num_windows, generator=self.generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; advances the position (and starts a new epoch after the last batch)."""
        if self.offset == self.batches_per_epoch:
            self.epoch += 1
            self.offset = 0
            self._start_epoch()
        picked = self._order[self.offset * self.batch_size : (self.offset + 1) * self.batch_size]
        self.offset += 1
        starts = picked * self.seq_len
        index = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.windows[index].long()
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict[str, object]:
        """The data position: ``epoch``, ``offset``, the generator state at the epoch's start,
        and the sizes it is valid for."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "generator": self._epoch_start_state.clone(),
            "num_windows": self.num_windows,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue exactly where the saved position left off."""
        for key in ("num_windows", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise CheckpointMismatchError(
                    f"data position: saved for {key}={state.get(key)!r}, this sampler has "
                    f"{getattr(self, key)!r}; use the corpus and batch size the run was started with"
                )
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor):
            raise CheckpointMismatchError("data position: 'generator' must be a tensor of generator state")
        self.generator.set_state(generator)
        self._start_epoch()
        self.epoch = int(state["epoch"])  # type: ignore[call-overload]
        self.offset = int(state["offset"])  # type: ignore[call-overload]
