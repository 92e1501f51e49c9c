"""Sharded evaluation under ``torchrun``: the same numbers as one process, computed by N.

The plan is made of whole batches of the single-process run: the records are cut into batches of the run's batch
size exactly as one process cuts them, and batch ``i`` goes to rank ``i mod N``. Every batch therefore sees exactly
the inputs it sees in one process (same images, same batch-mates, same per-sample random streams), so its outputs
are bit-identical on the same hardware and thread count; gathering the batches back in batch order rebuilds the
single-process tensors (a concatenation copies values, it rounds nothing).

Finished attack batches are saved as they go (:class:`BatchStore`, one safetensors file per batch, named by the
batch number of the single-process plan and keyed by the request and the batch's dataset indices), so a killed run
resumes with any number of ranks and recomputes only the missing batches. Without ``torchrun`` (``WORLD_SIZE`` 1)
everything here reduces to the plain single-process calls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from advreid.engine.distributed import dist_info, setup_device
from advreid.models.features import extract_features
from advreid.utils.io import atomic_write_with

__all__ = ["BatchStore", "ShardPlan", "distributed_session", "extract_sharded", "gather_batches", "is_main",
           "on_main", "rank_world"]


# ------------------------------------------------------------------------------------------- process group
def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes results and prints: rank 0 of the process group, or of ``torchrun``'s ``RANK``
    once the group is gone (True in a plain single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return dist_info().rank == 0


@contextmanager
def distributed_session(device: str | torch.device | None) -> Iterator[torch.device]:
    """This process's device, inside a process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPUs, as
    training: :func:`advreid.engine.distributed.setup_device`). A group opened here is closed on exit, without a
    final barrier: the last collective is the gather of the last batches, after which rank 0 alone scores and
    writes while the others may leave (on an error the process ends; ``torchrun`` stops the other ranks)."""
    info = dist_info()
    opened = info.distributed and not (dist.is_available() and dist.is_initialized())
    dev = setup_device(info, None if device is None else str(device))
    try:
        yield dev
    finally:
        if opened and dist.is_initialized():
            dist.destroy_process_group()


def on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on rank 0 only (e.g. creating the output folder); its return value, or the exception it raised,
    reaches every rank, so all ranks go on, or stop with the same error, together."""
    rank, world = rank_world()
    if world == 1:
        return fn(*args)
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [("ok", fn(*args))]
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class ShardPlan:
    """``n`` items in batches of ``batch_size`` (the single-process batching); batch ``i`` belongs to rank
    ``i mod world``."""

    n: int
    batch_size: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size}: expected a positive number of images")

    @classmethod
    def current(cls, n: int, batch_size: int) -> ShardPlan:
        """The plan of this process in the current process group."""
        rank, world = rank_world()
        return cls(n, batch_size, rank, world)

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def batch(self, i: int) -> range:
        """Positions (in the records) of batch ``i``."""
        return range(i * self.batch_size, min((i + 1) * self.batch_size, self.n))

    def mine(self) -> list[int]:
        """The batches of this rank, in order."""
        return list(range(self.rank, self.num_batches, self.world))

    def positions(self, batches: Sequence[int]) -> list[int]:
        """Record positions of ``batches`` in order: a loader over them with this batch size yields exactly those
        batches (only the very last batch of the plan can be short, and it comes last)."""
        return [j for i in batches for j in self.batch(i)]

    def counts(self) -> list[dict[str, int]]:
        """``[{"rank": r, "queries": n_r}, ...]``: how many items each rank takes (they add up to ``n``)."""
        return [{"rank": r, "queries": sum(len(self.batch(i)) for i in range(r, self.num_batches, self.world))}
                for r in range(self.world)]


def gather_batches(local: dict[int, Any], num_batches: int, *, to_all: bool = True) -> list[Any] | None:
    """Every rank's ``{batch number: payload}`` merged into the list of all payloads in batch order: on every rank
    (``to_all``) or on rank 0 only (the others get None). A missing batch is an error (a plan mismatch)."""
    rank, world = rank_world()
    if world > 1:
        if to_all:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, local)
        else:
            parts = [None] * world if rank == 0 else None  # type: ignore[assignment]
            dist.gather_object(local, parts, dst=0)
            if rank != 0:
                return None
        local = {k: v for part in parts for k, v in part.items()}
    missing = [i for i in range(num_batches) if i not in local]
    if missing:
        raise RuntimeError(f"sharded run: batches {missing[:5]} were computed by no rank (a rank planned another "
                           "split: every rank must see the same records and batch size)")
    return [local[i] for i in range(num_batches)]


def extract_sharded(model: nn.Module, data: Dataset, *, batch_size: int, to_all: bool = True,
                    **kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`advreid.models.features.extract_features` of ``data`` (same keywords), split over the ranks by whole
    batches of ``batch_size`` and gathered back in order: on every rank (``to_all``) or on rank 0 only (None on the
    others). In one process it is ``extract_features`` itself."""
    plan = ShardPlan.current(len(data), batch_size)  # type: ignore[arg-type]
    if plan.world == 1:
        return extract_features(model, data, batch_size=batch_size, **kw)
    mine = plan.mine()
    local: dict[int, tuple] = {}
    if mine:
        if plan.rank != 0:
            kw = {**kw, "progress": False}
        f, p, c = extract_features(model, Subset(data, plan.positions(mine)), batch_size=batch_size, **kw)
        start = 0
        for i in mine:
            stop = start + len(plan.batch(i))
            local[i] = (f[start:stop].clone(), p[start:stop].clone(), c[start:stop].clone())
            start = stop
    parts = gather_batches(local, plan.num_batches, to_all=to_all)
    if parts is None:
        return None
    if not parts:
        raise ValueError(f"{kw.get('desc', 'features')}: the dataset is empty, nothing to extract")
    return tuple(torch.cat([part[k] for part in parts]) for k in range(3))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- resume storage
class BatchStore:
    """Finished batches of one attacked set (one eps), each saved atomically as ``<root>/batch_<i>.safetensors``
    (``i``: the batch number of the single-process plan) with a key of the request (``key``, what the caller
    says the run is: attack, model, data, protocol) and of the batch (its dataset indices, eps...). A file whose key
    differs was made by another request or another batch size: it is not used (and is replaced)."""

    def __init__(self, root: str | Path, key: str = "") -> None:
        self.root = Path(root)
        self.key = str(key)

    def __repr__(self) -> str:
        return f"BatchStore({str(self.root)!r})"

    def child(self, name: str) -> BatchStore:
        """The store of a sub-run (one eps of a sweep) under ``root/name``, same request key."""
        return BatchStore(self.root / name, self.key)

    def batch_key(self, parts: dict[str, Any]) -> str:
        """Digest of the request key and a batch's own description (JSON-able ``parts``)."""
        text = json.dumps({"request": self.key, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, i: int) -> Path:
        return self.root / f"batch_{i:06d}.safetensors"

    def load(self, i: int, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, metadata) of finished batch ``i`` saved under ``key``; None when absent, unreadable or made by
        another request."""
        from safetensors import SafetensorError, safe_open

        path = self.path(i)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key:
                    return None
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- safe_open has no iterator
            return tensors, json.loads(meta.get("info", "{}"))
        except (OSError, ValueError, SafetensorError):
            return None  # damaged: computed again

    def save(self, i: int, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
        """Write batch ``i`` atomically (a kill leaves the old file or none, never half of one)."""
        from safetensors.torch import save_file

        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"key": key, "info": json.dumps(info)}
        return atomic_write_with(self.path(i), lambda tmp: save_file(data, tmp, metadata=meta))
