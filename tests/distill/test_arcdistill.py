import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.arcdistill import ArcDistill

CENTRES = torch.eye(2)


def _context(centres: torch.Tensor = CENTRES) -> MethodContext:
    return MethodContext(num_classes=centres.shape[0], embedding_size=centres.shape[1], centres=centres)


def _ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(z) for z in logits))


def test_arc_variant_is_arcface_on_the_teacher_centres() -> None:
    method = create_method({"name": "arcdistill", "scale": 2.0, "margin": 0.5}, _context())
    assert isinstance(method, ArcDistill)
    loss = method(torch.tensor([[0.6, 0.8]]), torch.tensor([0]), torch.zeros(1, 2))["arcface"]
    expected = _ce([2 * math.cos(math.acos(0.6) + 0.5), 2 * 0.8], 0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cos_variant_subtracts_its_default_margin() -> None:
    method = create_method({"name": "arcdistill", "scale": 2.0, "variant": "cos"}, _context())
    loss = method(torch.tensor([[0.6, 0.8]]), torch.tensor([0]), torch.zeros(1, 2))["cosface"]
    assert loss.item() == pytest.approx(_ce([2 * (0.6 - 0.35), 2 * 0.8], 0), rel=1e-5)


def test_gradient_reaches_the_student_and_not_the_frozen_centres() -> None:
    centres = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    method = create_method({"name": "arcdistill"}, _context(centres))
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(2, 4, requires_grad=True)
    method(student, torch.tensor([0, 2]), torch.randn(2, 4))["arcface"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert torch.equal(method.head.weight, centres)


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.scale must be > 0"):
        create_method({"name": "arcdistill", "scale": 0.0}, _context())
    with pytest.raises(ConfigError, match="method.margin"):
        create_method({"name": "arcdistill", "margin": -0.1}, _context())
    with pytest.raises(ConfigError, match="method.variant"):
        create_method({"name": "arcdistill", "variant": "sphere"}, _context())
    with pytest.raises(ValueError, match="needs a teacher"):
        create_method({"name": "arcdistill"}, MethodContext(2, 2))
