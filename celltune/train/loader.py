"""DataLoaders for the training loop: DDP sharding, per-epoch ``set_epoch``, device moves."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from celltune.train import distributed as dist_utils
from celltune.train.config import TrainConfig


def make_loader(
    dataset: torch.utils.data.Dataset[Any],
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_sampler: Iterable[list[int]] | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    eval: bool = False,
    device: torch.device | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader with the config's workers / pinned memory and DDP sharding.

    Workers are not persistent on purpose: the dataset and collate_fn are re-sent to them
    every epoch, so ``set_epoch`` (per-epoch masks) reaches the workers. Without a
    ``batch_sampler``, a ``DistributedSampler`` shards the data when running under DDP.
    """
    device = device or config.resolve_device(dist_utils.local_rank())
    common: dict[str, Any] = {
        "collate_fn": collate_fn,
        "num_workers": config.num_workers,
        "pin_memory": config.resolve_pin_memory(device),
    }
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
    batch_size = (config.eval_batch_size or config.batch_size) if eval else config.batch_size
    sampler = None
    if dist_utils.world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=dist_utils.world_size(),
            rank=dist_utils.rank(),
            shuffle=shuffle,
            seed=config.seed,
            drop_last=drop_last,
        )
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        **common,
    )


def lookahead(loader: Iterable[Any], cap: int | None) -> Iterator[tuple[int, Any, bool]]:
    """Yield ``(index, batch, is_last)``: the loop must know the last mini-batch to step on a
    short final accumulation group (and to sync DDP gradients there), even when the loader
    has no ``len``. Stops after ``cap`` mini-batches without fetching another one."""
    end = object()
    it = iter(loader)
    nxt = next(it, end)
    index = 0
    while nxt is not end:
        batch = nxt
        nxt = end if cap is not None and index + 1 >= cap else next(it, end)
        yield index, batch, nxt is end
        index += 1


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell samplers, dataset and collate_fn the epoch (they redraw shuffles / masks)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [
        loader,
        batch_sampler,
        getattr(batch_sampler, "sampler", None),  # torch BatchSampler wrapping a sampler
        getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
        getattr(loader, "collate_fn", None),
    ]
    seen: set[int] = set()
    for obj in candidates:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        setter = getattr(obj, "set_epoch", None)
        if callable(setter):
            setter(epoch)


def to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch
