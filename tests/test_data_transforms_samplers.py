"""Transforms (range, dtype, shape, flip/pad/erasing behaviour) and the P x K samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from advreid.data import IMAGENET_MEAN, DistributedPKSampler, ImageDataset, PKSampler, build_transforms


def _noise(w=20, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -------------------------------------------------------------------------------------------- transforms
def test_train_and_test_transforms_shape_range_dtype():
    torch.manual_seed(0)
    img = _noise()
    for is_train in (True, False):
        t = build_transforms(32, 16, is_train=is_train, random_erasing_p=0.5)
        out = t(img)
        assert out.shape == (3, 32, 16) and out.dtype == torch.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
    test = build_transforms(32, 16, is_train=False)
    assert torch.equal(test(img), test(img))
    flat = test(Image.new("RGB", (20, 40), (255, 0, 128)))
    assert torch.allclose(flat[:, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]))
    # uint8 tensor input goes through the same pipeline
    as_tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert test(as_tensor).shape == (3, 32, 16)


def test_flip_pad_crop_and_erasing_behaviour():
    img = _noise()
    test = build_transforms(32, 16, is_train=False)
    flip = build_transforms(32, 16, is_train=True, flip_p=1.0, pad=0)
    assert torch.equal(flip(img), test(img).flip(-1))
    assert torch.equal(build_transforms(32, 16, is_train=True, flip_p=0.0, pad=0)(img), test(img))

    white = Image.new("RGB", (16, 32), (255, 255, 255))
    padcrop = build_transforms(32, 16, is_train=True, flip_p=0.0, pad=4)
    torch.manual_seed(1)
    outs = [padcrop(white) for _ in range(10)]
    assert all(set(o.unique().tolist()) <= {0.0, 1.0} for o in outs)
    assert any((o == 0).any() for o in outs)  # the black padding shows after some crops

    black = Image.new("RGB", (16, 32), (0, 0, 0))
    erase = build_transforms(32, 16, is_train=True, flip_p=0.0, pad=0, random_erasing_p=1.0)
    torch.manual_seed(2)
    out = erase(black)
    erased = out[0] != 0
    assert 0 < erased.sum() < 32 * 16
    for c, m in enumerate(IMAGENET_MEAN):
        assert torch.allclose(out[c][erased], torch.tensor(m))


@pytest.mark.parametrize(
    "kwargs, name",
    [({"height": 0}, "height"), ({"flip_p": 1.5}, "flip_p"), ({"pad": -1}, "pad"),
     ({"random_erasing_p": -0.1}, "random_erasing_p"),
     ({"random_erasing_value": (0.1, 0.2)}, "random_erasing_value")],
)
def test_transform_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_transforms(is_train=True, **kwargs)


# ---------------------------------------------------------------------------------------------- samplers
COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12]  # images per identity -> groups of 4: [1]*7 + [2, 2, 3]
PIDS = [pid for pid, n in enumerate(COUNTS) for _ in range(n)]


def _batches(sampler):
    idx = list(sampler)
    assert len(idx) == len(sampler)
    bs = sampler.batch_size
    assert len(idx) % bs == 0
    return [idx[i : i + bs] for i in range(0, len(idx), bs)]


def test_pk_batches_have_p_ids_times_k_and_exact_length():
    s = PKSampler(PIDS, p=3, k=4, seed=0)
    # max batches B with sum(min(groups, B)) >= 3B is 4 (sum of groups = 14)
    assert len(s) == 4 * 12
    for epoch in range(15):
        s.set_epoch(epoch)
        batches = _batches(s)
        assert len(batches) == 4
        for b in batches:
            per_pid = Counter(PIDS[i] for i in b)
            assert len(per_pid) == 3 and set(per_pid.values()) == {4}
            for pid in per_pid:
                mine = [i for i in b if PIDS[i] == pid]
                assert all(PIDS[i] == pid for i in mine)
                if COUNTS[pid] >= 4:  # no replacement when an identity has enough images
                    assert len(set(mine)) == 4


def test_pk_reaches_max_batches_when_random_choice_could_fall_short():
    pids = [0] * 6 + [1] * 2 + [2] * 2  # groups of 2: [3, 1, 1]; p=2 -> 2 batches, both need pid 0
    s = PKSampler(pids, p=2, k=2, seed=3)
    assert len(s) == 8
    for epoch in range(20):
        s.set_epoch(epoch)
        batches = _batches(s)
        assert len(batches) == 2 and all(0 in {pids[i] for i in b} for b in batches)


def test_pk_determinism_and_epoch_change():
    a, b = PKSampler(PIDS, p=3, k=4, seed=7), PKSampler(PIDS, p=3, k=4, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(3)
    assert list(a) != first
    assert list(PKSampler(PIDS, p=3, k=4, seed=8)) != list(PKSampler(PIDS, p=3, k=4, seed=7))


def test_pk_state_round_trip_and_errors():
    a = PKSampler(PIDS, p=3, k=4, seed=5)
    a.set_epoch(4)
    state = a.state_dict()
    assert state == {"epoch": 4, "seed": 5}
    b = PKSampler(PIDS, p=3, k=4, seed=0)
    b.load_state_dict(state)
    assert list(b) == list(a)
    with pytest.raises(KeyError, match="seed"):
        b.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="only 10 identities"):
        PKSampler(PIDS, p=11, k=2)


def test_distributed_ranks_disjoint_equal_and_interleaved():
    pids = [pid for pid in range(8) for _ in range(8)]  # 8 ids x 2 groups of 4 -> 8 global batches (p=2)
    glob = PKSampler(pids, p=2, k=4, seed=1)
    glob.set_epoch(5)
    g_batches = _batches(glob)
    assert len(g_batches) == 8
    ranks = [DistributedPKSampler(pids, p=2, k=4, seed=1, num_replicas=3, rank=r) for r in range(3)]
    seen: list[set[int]] = []
    for r, s in enumerate(ranks):
        s.set_epoch(5)
        mine = _batches(s)
        assert len(s) == 2 * 8 and len(mine) == 2  # 8 // 3 = 2 whole batches each, tail of 2 dropped
        assert mine == g_batches[r:6:3]
        seen.append({i for b in mine for i in b})
    assert sum(len(x) for x in seen) == len(set().union(*seen)) == 48
    solo = DistributedPKSampler(pids, p=2, k=4, seed=1)  # no process group -> 1 replica, rank 0
    assert (solo.num_replicas, solo.rank, len(solo)) == (1, 0, len(glob))
    with pytest.raises(ValueError, match="rank=3"):
        DistributedPKSampler(pids, p=2, k=4, num_replicas=3, rank=3)
    with pytest.raises(ValueError, match="replicas"):
        DistributedPKSampler(pids, p=2, k=4, num_replicas=9, rank=0)


def test_loader_with_pk_sampler_and_transforms(tmp_path):
    records = []
    for pid in range(4):
        for j in range(3):
            path = tmp_path / f"{pid:04d}_c1_{j}.jpg"
            _noise(seed=pid * 10 + j).save(path)
            records.append((str(path), pid, 0))
    ds = ImageDataset(records, transform=build_transforms(16, 8, is_train=True))
    sampler = PKSampler([r[1] for r in records], p=2, k=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=sampler.batch_size, sampler=sampler, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(sampler) // 4 == 2
    imgs, pids, camids, idx = batches[0]
    assert imgs.shape == (4, 3, 16, 8) and imgs.dtype == torch.float32
    assert len(set(pids.tolist())) == 2 and torch.equal(pids, torch.tensor([records[i][1] for i in idx]))
