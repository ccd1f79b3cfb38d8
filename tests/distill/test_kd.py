import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.kd import soft_kd

CENTRES = torch.eye(2)


def _context(centres: torch.Tensor = CENTRES) -> MethodContext:
    return MethodContext(num_classes=centres.shape[0], embedding_size=centres.shape[1], centres=centres)


def _softmax(z: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in z)
    return [math.exp(v) / total for v in z]


def test_kd_term_matches_hand_value() -> None:
    # s = 2, T = 2: student logits [2, 0] / 2 = [1, 0], teacher logits [0, 2] / 2 = [0, 1].
    method = create_method({"name": "kd", "scale": 2.0, "temperature": 2.0, "kd_weight": 3.0}, _context())
    terms = method(torch.tensor([[5.0, 0.0]]), torch.tensor([1]), torch.tensor([[0.0, 0.5]]))
    p_t, p_s = _softmax([0.0, 1.0]), _softmax([1.0, 0.0])
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    assert terms["kd"].item() == pytest.approx(3.0 * 4.0 * kl, rel=1e-5)
    # Hard-label ArcFace on the same frozen centres: cos to class 1 is 0, to class 0 is 1.
    logits = [2 * 1.0, 2 * math.cos(math.pi / 2 + 0.5)]
    expected = -logits[1] + math.log(sum(math.exp(z) for z in logits))
    assert terms["arcface"].item() == pytest.approx(expected, rel=1e-5)


def test_soft_kd_averages_over_the_batch_and_vanishes_on_agreement() -> None:
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    per_sample = [
        sum(
            t * math.log(t / s)
            for t, s in zip(_softmax((teacher[i] / 4).tolist()), _softmax((student[i] / 4).tolist()), strict=True)
        )
        for i in range(2)
    ]
    assert soft_kd(student, teacher, 4.0).item() == pytest.approx(16 * sum(per_sample) / 2, rel=1e-5)
    assert soft_kd(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_gradient_reaches_the_student_and_not_the_centres() -> None:
    centres = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    method = create_method({"name": "kd"}, _context(centres))
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(2, 4, requires_grad=True)
    method(student, torch.tensor([0, 2]), torch.randn(2, 4))["kd"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert torch.equal(method.head.weight, centres)


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        create_method({"name": "kd", "temperature": 0.0}, _context())
    with pytest.raises(ConfigError, match="method.kd_weight must be >= 0"):
        create_method({"name": "kd", "kd_weight": -1.0}, _context())
    with pytest.raises(ConfigError, match="method: unknown key"):
        create_method({"name": "kd", "tau": 2.0}, _context())
