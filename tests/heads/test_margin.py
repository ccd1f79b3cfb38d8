import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.heads import MarginHead, margin_target_logit


def _head_with_unit_centres(**kwargs) -> MarginHead:
    return MarginHead(2, 2, centres=torch.eye(2), **kwargs)


def test_arcface_true_logit_matches_hand_value() -> None:
    head = _head_with_unit_centres(scale=1.0, m2=0.5)
    embedding = torch.tensor([[0.6, 0.8]])  # cos to class 0 = 0.6, to class 1 = 0.8
    logits = head.logits(embedding, torch.tensor([0]))
    expected_true = math.cos(math.acos(0.6) + 0.5)  # = 0.14314...
    assert logits[0, 0].item() == pytest.approx(expected_true, abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(0.8, abs=1e-6)


def test_scale_multiplies_every_logit() -> None:
    head = _head_with_unit_centres(scale=64.0, m2=0.5)
    logits = head.logits(torch.tensor([[0.6, 0.8]]), torch.tensor([1]))
    assert logits[0, 0].item() == pytest.approx(64 * 0.6, abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(64 * math.cos(math.acos(0.8) + 0.5), abs=1e-3)


def test_cosface_and_sphereface_margins() -> None:
    cos = torch.tensor([0.6])
    assert margin_target_logit(cos, 1.0, 0.0, 0.35).item() == pytest.approx(0.25, abs=1e-6)
    assert margin_target_logit(cos, 1.5, 0.0, 0.0).item() == pytest.approx(math.cos(1.5 * math.acos(0.6)), abs=1e-5)
    combined = margin_target_logit(cos, 1.2, 0.3, 0.1).item()
    assert combined == pytest.approx(math.cos(1.2 * math.acos(0.6) + 0.3) - 0.1, abs=1e-5)


def test_per_sample_margins_replace_m2() -> None:
    head = _head_with_unit_centres(scale=1.0, m2=0.5)
    embeddings = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    logits = head.logits(embeddings, torch.tensor([0, 0]), margin=torch.tensor([0.2, 0.45]))
    assert logits[0, 0].item() == pytest.approx(math.cos(math.acos(0.6) + 0.2), abs=1e-5)
    assert logits[1, 0].item() == pytest.approx(math.cos(math.acos(0.6) + 0.45), abs=1e-5)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_cos_plus_minus_one_gives_finite_values_and_gradients(direction: float) -> None:
    head = MarginHead(3, 4, scale=64.0, m2=0.5)
    embeddings = (direction * head.weight.detach()[:2].clone()).requires_grad_()
    logits = head.logits(embeddings, torch.tensor([0, 1]))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(embeddings.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_at_cos_one_the_logit_is_cos_m() -> None:
    assert margin_target_logit(torch.tensor([1.0]), 1.0, 0.5, 0.0).item() == pytest.approx(math.cos(0.5), abs=1e-3)


def test_beyond_pi_the_target_continues_monotonically_and_continuously() -> None:
    m = 0.5
    # theta + m > pi: documented continuation cos(theta) - cos(pi - m) - 1
    cos = torch.tensor([-0.99])
    expected = -0.99 - math.cos(math.pi - m) - 1.0
    assert margin_target_logit(cos, 1.0, m, 0.0).item() == pytest.approx(expected, abs=1e-5)
    thetas = torch.linspace(0.01, math.pi - 0.01, 2001, dtype=torch.float64)
    values = margin_target_logit(torch.cos(thetas), 1.0, m, 0.0)
    assert (values[1:] < values[:-1]).all(), "target logit must decrease with the angle"
    assert values.diff().abs().max() < 0.01, "no jump at the boundary theta = pi - m"


def test_frozen_centres_are_normalised_buffers_and_learnable_ones_parameters() -> None:
    centres = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    frozen = MarginHead(2, 2, centres=centres, learnable=False)
    assert list(frozen.parameters()) == []
    assert torch.allclose(frozen.weight, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    learnable = MarginHead(2, 2, centres=centres)
    assert [p.shape for p in learnable.parameters()] == [torch.Size([2, 2])]


def test_wrong_centre_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="expected \\(5, 128\\)"):
        MarginHead(5, 128, centres=torch.zeros(5, 512), learnable=False)
    with pytest.raises(ValueError, match="frozen centres need"):
        MarginHead(5, 128, learnable=False)
