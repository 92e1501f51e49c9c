"""Per-sample and per-step random streams: every random draw comes from a generator seeded from the run's seed and
the sample's (or the step's) identity, so results do not depend on batch composition, batch size or a resume."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch


def sample_generators(seed: int, index: torch.Tensor | Sequence[int], stream: str | int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from ``(seed, index[i], stream)`` (independent of batch composition)."""
    sid = zlib.crc32(stream.encode()) if isinstance(stream, str) else int(stream)
    ids = index.tolist() if isinstance(index, torch.Tensor) else list(index)
    gens = []
    for i in ids:
        state = np.random.SeedSequence([int(seed), int(i), sid]).generate_state(2, dtype=np.uint32)
        g = torch.Generator()
        g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
        gens.append(g)
    return gens


def per_sample_rand(generators: Sequence[torch.Generator], shape: Sequence[int], *, dtype: torch.dtype,
                    device: torch.device | str = "cpu", normal: bool = False) -> torch.Tensor:
    """(B, *shape) uniform [0,1) (or standard normal) values, sample i drawn from ``generators[i]``."""
    fn = torch.randn if normal else torch.rand
    if not generators:
        return torch.empty((0, *shape), dtype=dtype, device=device)
    return torch.stack([fn(tuple(shape), generator=g, dtype=dtype) for g in generators]).to(device)


def batch_generator(seed: int, epoch: int, step: int, rank: int, stream: str) -> torch.Generator:
    """A CPU generator for one training step's random draws of one hook (``stream``: "proactive", "goat"),
    seeded from (seed, epoch, step, rank, stream) only, so a resumed run draws exactly what a straight run does."""
    mask = 2**64 - 1
    ss = np.random.SeedSequence([int(seed) & mask, int(epoch), int(step), int(rank), zlib.crc32(stream.encode())])
    s0, s1 = (int(v) for v in ss.generate_state(2, dtype=np.uint32))
    g = torch.Generator()
    g.manual_seed((s0 << 32) | s1)
    return g
