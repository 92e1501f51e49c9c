"""P x K identity samplers for metric learning (BoT/torchreid ``RandomIdentitySampler`` semantics).

Every batch of ``p * k`` indices holds ``p`` distinct identities with ``k`` images each. The epoch length is
exact: the sampler forms the largest possible number of batches from the per-identity groups and picks
identities at random, forcing only those needed so that this maximum is reached.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["PKSampler", "DistributedPKSampler"]


def _max_batches(group_counts: Sequence[int], p: int) -> int:
    """Largest B with sum_i min(g_i, B) >= p * B: the most batches of p distinct identities."""
    g = np.asarray(group_counts)
    best, b = 0, 1
    while b * p <= g.sum():
        if np.minimum(g, b).sum() >= p * b:
            best = b
        else:
            break  # sum min(g, B) - pB is concave and 0 at B=0, so it stays negative from here
        b += 1
    return best


class PKSampler(torch.utils.data.Sampler[int]):
    """Yields indices in batches of ``p`` identities x ``k`` images; use with ``batch_size=p*k``.

    Per epoch: each identity's indices are shuffled and cut into groups of ``k`` (identities with fewer than
    ``k`` images are sampled with replacement up to ``k``; a remainder < k is dropped), then batches take one
    group from each of ``p`` distinct random identities. Deterministic in ``(seed, epoch)``; call
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, pids: Sequence[int], p: int = 16, k: int = 4, seed: int = 0) -> None:
        if not (isinstance(p, int) and p >= 1 and isinstance(k, int) and k >= 1):
            raise ValueError(f"PKSampler: p={p!r}, k={k!r}; expected positive ints")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"PKSampler: seed={seed!r}; expected an int >= 0")
        by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            by_pid[int(pid)].append(i)
        if len(by_pid) < p:
            raise ValueError(f"PKSampler: only {len(by_pid)} identities for p={p} identities per batch")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self._pids = sorted(by_pid)
        self._indices = [np.asarray(by_pid[pid], dtype=np.int64) for pid in self._pids]
        self._groups = [max(1, len(ix) // k) for ix in self._indices]
        self.num_batches_total = _max_batches(self._groups, p)

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle for ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "seed"} - set(state)
        if missing:
            raise KeyError(f"PKSampler.load_state_dict: missing keys {sorted(missing)}; got {sorted(state)}")
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def _global_batches(self) -> list[np.ndarray]:
        """All batches of this epoch, each an array of p*k dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: list[list[np.ndarray]] = []
        for ix in self._indices:
            ix = rng.choice(ix, size=self.k, replace=True) if len(ix) < self.k else rng.permutation(ix)
            n = len(ix) // self.k
            groups.append([ix[j * self.k:(j + 1) * self.k] for j in range(n)])
        remaining = np.array([len(g) for g in groups])
        batches = []
        for left in range(self.num_batches_total, 0, -1):
            # Feasibility of the remaining `left` batches: identities holding >= left groups must be used
            # at least `must` times this round (see module docstring).
            slack = int(np.minimum(remaining, left).sum()) - self.p * left
            high = np.flatnonzero(remaining >= left)
            must = max(0, len(high) - slack)
            chosen = list(rng.choice(high, size=must, replace=False)) if must else []
            others = np.setdiff1d(np.flatnonzero(remaining > 0), chosen)
            chosen += list(rng.choice(others, size=self.p - must, replace=False))
            batch = []
            for c in chosen:
                remaining[c] -= 1
                batch.append(groups[c][remaining[c]])
            batches.append(np.concatenate(batch))
        return batches

    def _my_batches(self) -> list[np.ndarray]:
        return self._global_batches()

    def __iter__(self) -> Iterator[int]:
        for batch in self._my_batches():
            yield from (int(i) for i in batch)

    def __len__(self) -> int:
        return self.num_batches_total * self.batch_size


class DistributedPKSampler(PKSampler):
    """:class:`PKSampler` for DDP: every rank builds the same global batch list and rank ``r`` takes batches
    ``r, r+R, ...``; the tail is dropped so all ranks get the same number of whole P x K batches."""

    def __init__(
        self,
        pids: Sequence[int],
        p: int = 16,
        k: int = 4,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"DistributedPKSampler: rank={rank}, num_replicas={num_replicas}; expected 0 <= rank < R"
            )
        super().__init__(pids, p=p, k=k, seed=seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.num_batches = self.num_batches_total // num_replicas
        if self.num_batches == 0:
            raise ValueError(
                f"DistributedPKSampler: only {self.num_batches_total} P x K batches per epoch for "
                f"{num_replicas} replicas; use a smaller p or k, or fewer replicas"
            )

    def _my_batches(self) -> list[np.ndarray]:
        batches = self._global_batches()[: self.num_batches * self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches * self.batch_size
