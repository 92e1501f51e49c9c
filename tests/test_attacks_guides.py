"""Tests for advreid.attacks.guides: same-identity lookup, selection rules, exclusions, centroids."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advreid.attacks import GuideBank, Guides, sample_generators


@pytest.fixture
def bank() -> GuideBank:
    # rows:      0  1  2  3  4  5  6  7
    pids = [3, 1, 3, 1, 3, 7, -1, 1]
    camids = [0, 0, 1, 1, 0, 2, 0, 2]
    feats = torch.arange(8, dtype=torch.float64)[:, None] * torch.ones(1, 2)  # row r has feature (r, r)
    return GuideBank(feats, pids, camids, source="gallery")


def _rows(mask: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    return [sorted(i for i, m in zip(r.tolist(), mr.tolist(), strict=True) if m)
            for r, mr in zip(idx, mask, strict=True)]


def test_same_identity_all_keeps_bank_order_and_masks_padding(bank: GuideBank) -> None:
    f, mask, idx = bank.same_identity(torch.tensor([3, 1, 7, 9]))
    assert f.shape == (4, 3, 2) and mask.shape == (4, 3)
    assert _rows(mask, idx) == [[0, 2, 4], [1, 3, 7], [5], []]  # 9 is not in the bank: no guides
    assert torch.equal(f[0, :, 0], torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64))
    assert bank.max_count == 3 and bank.num_ids == 4


def test_last_selects_last_in_record_order_and_same_camera_option(bank: GuideBank) -> None:
    _, mask, idx = bank.same_identity(torch.tensor([3, 1]), select="last")
    assert _rows(mask, idx) == [[4], [7]]
    # seed variant includes same-camera guides; excluding them (camid 0 for pid 3) moves "last" to row 2
    _, mask, idx = bank.same_identity(torch.tensor([3, 1]), torch.tensor([0, 2]), select="last",
                                      exclude_same_camera=True)
    assert _rows(mask, idx) == [[2], [3]]


def test_exclude_self_and_random1(bank: GuideBank) -> None:
    _, mask, idx = bank.same_identity(torch.tensor([3, 7]), exclude=torch.tensor([2, 5]))
    assert _rows(mask, idx) == [[0, 4], []]
    picks = set()
    for s in range(40):
        gens = sample_generators(s, torch.tensor([0, 1]), "guides")
        _, mask, idx = bank.same_identity(torch.tensor([3, 3]), select="random1", exclude=torch.tensor([4, -1]),
                                          generators=gens)
        assert mask.shape == (2, 1) and mask.all()
        assert idx[0, 0].item() in (0, 2)  # never itself
        picks.add(idx[1, 0].item())
    assert picks == {0, 2, 4}  # all same-identity entries reachable


def test_centroids_skip_junk_and_furthest_is_hand_checked() -> None:
    feats = torch.tensor([[0.0, 0], [2, 0], [10, 0], [12, 0], [0, 5], [0, 7], [50, 50]])
    b = GuideBank(feats, [1, 1, 2, 2, 3, 3, -1], [0, 1, 0, 1, 0, 1, 0], source="query")
    ids, cents = b.centroids()
    assert ids.tolist() == [1, 2, 3]
    assert torch.equal(cents, torch.tensor([[1.0, 0], [11, 0], [0, 6]]))
    # from (1,0) (identity 1): identity 2 at distance 10 beats identity 3 at sqrt(37); junk (-1) is never chosen
    c, pid = b.furthest_centroid(torch.tensor([[1.0, 0], [11, 0], [0, 6]]), torch.tensor([1, 2, 3]))
    assert pid.tolist() == [2, 3, 2] and torch.equal(c[0], torch.tensor([11.0, 0]))
    # normalised comparison: directions only; from (1,0) the (0,6) centroid is furthest on the sphere
    _, pid = b.furthest_centroid(torch.tensor([[1.0, 0]]), torch.tensor([1]), normalize=True)
    assert pid.tolist() == [3]
    for s in range(10):
        _, pid = b.random_centroid(torch.tensor([1, 2]), sample_generators(s, torch.tensor([0, 1]), "pull"))
        assert pid[0].item() in (2, 3) and pid[1].item() in (1, 3)


def test_single_identity_bank_has_no_negative() -> None:
    b = GuideBank(torch.randn(3, 4), [5, 5, 5])
    with pytest.raises(ValueError, match="other than each sample's own"):
        b.furthest_centroid(torch.randn(1, 4), torch.tensor([5]))


def test_from_images_tensor_and_loader_match_raw_features() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    x = torch.rand(5, 3, 8, 8)
    pids, cams = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 2, 1, 2, 1])
    b1 = GuideBank.from_images(model, x, pids, cams, batch_size=2, source="query")
    loader = [(x[:3], pids[:3], cams[:3]), (x[3:], pids[3:], cams[3:])]
    b2 = GuideBank.from_images(model, loader)
    assert model.training  # mode restored
    with torch.no_grad():
        want = model.eval()(x)
    assert torch.allclose(b1.features, want, atol=1e-6) and torch.allclose(b2.features, want, atol=1e-6)
    assert torch.equal(b2.pids, pids) and torch.equal(b2.camids, cams) and b1.source == "query"


def test_bank_and_guides_validation() -> None:
    with pytest.raises(ValueError, match="float \\(N,D\\)"):
        GuideBank(torch.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match="pids must be an integer tensor of shape \\(3,\\)"):
        GuideBank(torch.zeros(3, 2), [1, 2])
    with pytest.raises(ValueError, match="select='nearest'"):
        GuideBank(torch.zeros(3, 2), [1, 2, 3]).same_identity(torch.tensor([1]), select="nearest")
    g = Guides(push=torch.ones(2, 4))
    assert g.push.shape == (2, 1, 4) and g.push_mask.all() and g.batch_size() == 2
    with pytest.raises(ValueError, match="push_mask must be"):
        Guides(push=torch.ones(2, 3, 4), push_mask=torch.ones(2, 2))
