"""Tests for advreid.losses against hand-built cases and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advreid.losses import CrossEntropyLabelSmooth, ReIDLoss, TripletLoss
from advreid.models import build_model


def test_label_smoothing_matches_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    pids = torch.tensor([0, 1])
    eps, k = 0.1, 3
    expected = 0.0
    for i in range(2):
        logp = [lv - math.log(sum(math.exp(v) for v in logits[i].tolist())) for lv in logits[i].tolist()]
        q = [(1 - eps) * (j == pids[i].item()) + eps / k for j in range(k)]
        expected += -sum(qj * lj for qj, lj in zip(q, logp, strict=True)) / 2
    got = CrossEntropyLabelSmooth(3, epsilon=eps)(logits, pids)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(CrossEntropyLabelSmooth(3, 0.0)(logits, pids), F.cross_entropy(logits, pids))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        CrossEntropyLabelSmooth(3)(logits, torch.tensor([0, 3]))


def _brute_force(feats: torch.Tensor, pids: torch.Tensor, margin: float | None) -> tuple[float, float]:
    losses, correct = [], 0
    n = len(pids)
    for a in range(n):
        pos = [j for j in range(n) if j != a and pids[j] == pids[a]]
        neg = [j for j in range(n) if pids[j] != pids[a]]
        if not pos or not neg:
            continue
        d = [(feats[a] - feats[j]).norm().item() for j in range(n)]
        d_ap, d_an = max(d[j] for j in pos), min(d[j] for j in neg)
        x = d_ap - d_an
        losses.append(math.log1p(math.exp(x)) if margin is None else max(0.0, x + margin))
        correct += d_an > d_ap
    return sum(losses) / len(losses), correct / len(losses)


@pytest.mark.parametrize("margin", [0.3, None, 0.0])
def test_batch_hard_triplet_equals_brute_force(margin: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(13, 6, generator=g)
    pids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5])  # ids 3 and 5 have a single image
    loss, acc = TripletLoss(margin)(feats, pids, return_accuracy=True)
    exp_loss, exp_acc = _brute_force(feats, pids, None if not margin else margin)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5, abs=1e-6)
    assert acc.item() == pytest.approx(exp_acc)
    assert loss.item() > 0


def test_triplet_singletons_only_gives_zero_with_grad() -> None:
    feats = torch.randn(4, 5, requires_grad=True)
    loss = TripletLoss(0.3)(feats, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.zeros_like(feats))


def test_triplet_gradient_flows_and_easy_case_satisfied() -> None:
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], requires_grad=True)
    loss, acc = TripletLoss(0.3)(feats, torch.tensor([0, 0, 1, 1]), return_accuracy=True)
    assert loss.item() == 0.0 and acc.item() == 1.0
    hard = feats.detach().clone().requires_grad_(True)
    loss = TripletLoss(0.3)(hard, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert loss.item() > 0 and hard.grad.abs().sum() > 0


def test_reid_loss_combines_parts_on_model_dict() -> None:
    torch.manual_seed(0)
    model = build_model("cnn4", 4).train()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model(torch.rand(8, 3, 32, 16))
    crit = ReIDLoss(4, ce_weight=1.0, triplet_weight=2.0, label_smooth=0.1, margin=0.3)
    total, parts = crit(out, pids)
    ce = CrossEntropyLabelSmooth(4, 0.1)(out["logits"], pids)
    tri = TripletLoss(0.3)(out["feat_before_bn"], pids)
    torch.testing.assert_close(total, ce + 2.0 * tri)
    assert set(parts) == {"ce", "acc", "triplet", "triplet_acc", "total"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["total"] == pytest.approx(total.item())
    total.backward()
    assert model.backbone.body[0].weight.grad is not None
    after = ReIDLoss(4, triplet_on="feat_after_bn", ce_weight=0.0)(out, pids)[0]
    torch.testing.assert_close(after, TripletLoss(0.3)(out["feat_after_bn"], pids))
    with pytest.raises(ValueError, match="no logits"):
        ReIDLoss(4)(build_model("cnn4", 0).train()(torch.rand(2, 3, 32, 16)), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="training-mode"):
        ReIDLoss(4)(model.eval()(torch.rand(2, 3, 32, 16)), torch.tensor([0, 1]))
