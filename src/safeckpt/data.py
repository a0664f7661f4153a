"""``ResumableSampler``: a shuffling sampler whose position in the data can be checkpointed.

A plain ``DataLoader`` cannot say where it is; saving that takes a sampler that knows. This one
works for any map-style dataset: its state is the epoch, the offset (indices or batches already
handed out this epoch) and its generator's state *at the start of the epoch*, from which the
epoch's order is drawn again on resume, and the first ``offset`` items skipped. Pass it in
``extra=`` to :func:`~safeckpt.save_checkpoint` / :func:`~safeckpt.load_checkpoint` or a
:class:`~safeckpt.CheckpointManager`.

The offset counts what the ``DataLoader`` has taken from the sampler, which is what the loop has
consumed when ``num_workers=0``. With worker processes the ``DataLoader`` takes a few batches
ahead (``prefetch_factor * num_workers``); use torchdata's ``StatefulDataLoader`` there, whose
``state_dict()`` accounts for that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch

from .errors import CheckpointMismatchError

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int | list[int]]):
    """Shuffled (or sequential) indices or batches of indices that resume exactly.

    Args:
        data: the map-style dataset (anything with ``len()``) or its length.
        batch_size: None (default) yields single indices, for ``DataLoader(sampler=...)``; an int
            yields lists of that many indices, for ``DataLoader(batch_sampler=...)``.
        shuffle: draw a new random order every epoch (default); False keeps dataset order.
        drop_last: with ``batch_size``, drop the last incomplete batch of each epoch.
        seed: seed of the sampler's own generator; None draws one from torch's global generator
            (so ``torch.manual_seed`` fixes it, as for torch's ``RandomSampler``).

    Iterating starts where the previous iteration stopped: after the last item of an epoch the
    next iteration is the next epoch, and after a ``break`` (or ``load_state_dict``) it continues
    the current one.

    Example:
        >>> sampler = ResumableSampler(dataset, batch_size=32)  # doctest: +SKIP
        >>> loader = DataLoader(dataset, batch_sampler=sampler)  # doctest: +SKIP
        >>> mgr.save(step, model=model, optimizer=opt, extra={"data": sampler})  # doctest: +SKIP
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        size = data if isinstance(data, int) else len(data)
        if isinstance(size, bool) or size < 0:
            raise ValueError(f"ResumableSampler: the dataset length must be a non-negative int, got {size!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"ResumableSampler: batch_size must be a positive int or None, got {batch_size!r}")
        self.num_samples = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.offset = 0
        """Items (indices, or batches with ``batch_size``) already handed out this epoch."""
        self._epoch_start = self.generator.get_state()

    def __len__(self) -> int:
        """Items per epoch: indices, or batches when ``batch_size`` is set."""
        if self.batch_size is None:
            return self.num_samples
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _order(self) -> list[int]:
        """This epoch's order, drawn from the generator state at the epoch's start; leaves the
        generator where the next epoch starts."""
        self.generator.set_state(self._epoch_start)
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=self.generator).tolist()
        return list(range(self.num_samples))

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.offset = 0
        self._epoch_start = self.generator.get_state()

    def __iter__(self) -> Iterator[int | list[int]]:
        order = self._order()
        if self.offset >= len(self):  # saved right after an epoch's last item
            self._next_epoch()
            order = self._order()
        items: list[int] | list[list[int]] = order
        if self.batch_size is not None:
            size = self.batch_size
            items = [order[i : i + size] for i in range(0, size * len(self), size)]
        for item in items[self.offset :]:
            self.offset += 1  # before yielding: the item is handed out once the caller has it
            yield item
        self._next_epoch()

    def state_dict(self) -> dict[str, object]:
        """Epoch, offset and the generator state at the epoch's start, plus the sizes it needs."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "epoch_start_rng": self._epoch_start.clone(),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from ``state``; the dataset length and batching must be those it was saved with."""
        saved = {k: state.get(k) for k in ("num_samples", "batch_size", "shuffle", "drop_last")}
        here = {"num_samples": self.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}  # fmt: skip
        if saved != here:
            raise CheckpointMismatchError(
                f"ResumableSampler: the saved position is for {saved}, this sampler has {here}; "
                "build the sampler over the same dataset with the same arguments"
            )
        epoch, offset, rng = state.get("epoch"), state.get("offset"), state.get("epoch_start_rng")
        if not (isinstance(epoch, int) and isinstance(offset, int) and isinstance(rng, torch.Tensor)) or offset < 0:
            raise CheckpointMismatchError(
                "ResumableSampler: the saved state needs int 'epoch', int 'offset' >= 0 and the "
                "tensor 'epoch_start_rng'; it was saved from something else"
            )
        self.generator.set_state(rng)  # validates the state before anything changes
        self.epoch, self.offset, self._epoch_start = epoch, offset, rng.clone()
