import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.gkd import grouped_kd_terms, primary_mask
from facedistill.distill.kd import soft_kd


def _softmax(z: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in z)
    return [math.exp(v) / total for v in z]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_primary_group_is_the_smallest_set_reaching_the_threshold() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.96, 0.02, 0.01, 0.01]])
    assert primary_mask(probs, 0.93).tolist() == [[True, True, False, True], [True, False, False, False]]
    assert primary_mask(probs, 0.75).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_terms_match_a_naive_computation() -> None:
    student, teacher = [0.0, 1.0, 2.0, 0.5], [3.0, 2.5, 0.0, -1.0]
    terms = grouped_kd_terms(torch.tensor([student]), torch.tensor([teacher]), 2.0, 0.8)
    p, q = _softmax([v / 2 for v in teacher]), _softmax([v / 2 for v in student])
    primary = [0, 1]  # p ~ [0.47, 0.36, 0.10, 0.06]: classes 0 and 1 reach 0.8
    assert primary_mask(torch.tensor([p]), 0.8).nonzero()[:, 1].tolist() == primary
    secondary = [2, 3]
    p_pri, q_pri = sum(p[c] for c in primary), sum(q[c] for c in primary)
    binary = _kl([p_pri, 1 - p_pri], [q_pri, 1 - q_pri])
    within = [
        _kl([p[c] / sum(p[k] for k in g) for c in g], [q[c] / sum(q[k] for k in g) for c in g])
        for g in (primary, secondary)
    ]
    assert terms["binary"].item() == pytest.approx(binary, rel=1e-5)
    assert terms["primary"].item() == pytest.approx(within[0], rel=1e-5)
    assert terms["secondary"].item() == pytest.approx(within[1], rel=1e-5)
    assert terms["primary_mass"].item() == pytest.approx(p_pri, rel=1e-6)


def test_the_three_parts_decompose_plain_kd() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = 10 * torch.randn(3, 7, generator=generator), 10 * torch.randn(3, 7, generator=generator)
    terms = grouped_kd_terms(student, teacher, 4.0, 0.93)
    whole = (
        terms["binary"] + terms["primary_mass"] * terms["primary"] + (1 - terms["primary_mass"]) * terms["secondary"]
    )
    assert (whole.mean() * 16).item() == pytest.approx(soft_kd(student, teacher, 4.0).item(), rel=1e-4)


def test_empty_secondary_group_gives_finite_values_and_gradients() -> None:
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    terms = grouped_kd_terms(student, torch.tensor([[0.0, 0.0]]), 1.0, 1.0)  # both classes are primary
    assert terms["binary"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["secondary"].item() == 0.0
    (terms["binary"] + terms["primary"]).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def _context(classes: int = 5, dim: int = 3) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres, steps_per_epoch=10)


def test_method_uses_scaled_cosines_and_warms_up_linearly() -> None:
    context = _context()
    method = create_method({"name": "gkd", "scale": 8.0, "warmup_epochs": 2.0}, context)
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 3])
    cos_s = F.normalize(student, dim=1) @ context.centres.T
    cos_t = F.normalize(teacher, dim=1) @ context.centres.T
    full = grouped_kd_terms(8 * cos_s, 8 * cos_t, 4.0, 0.93)
    method.set_progress(0, 0.0)
    assert method(student, labels, teacher)["gkd_binary"].item() == 0.0
    method.set_progress(5, 0.5)
    terms = method(student, labels, teacher)
    assert terms["gkd_binary"].item() == pytest.approx(0.25 * 16 * full["binary"].mean().item(), rel=1e-5)
    assert terms["gkd_primary"].item() == pytest.approx(0.25 * 16 * full["primary"].mean().item(), rel=1e-5)
    method.set_progress(50, 5.0)
    terms = method(student, labels, teacher)
    assert terms["gkd_primary"].item() == pytest.approx(16 * full["primary"].mean().item(), rel=1e-5)


def test_gradient_reaches_the_student_and_not_the_centres() -> None:
    method = create_method({"name": "gkd", "warmup_epochs": 0.0}, _context())
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(4, 3, requires_grad=True)
    terms = method(student, torch.tensor([0, 1, 2, 3]), torch.randn(4, 3))
    (terms["gkd_binary"] + terms["gkd_primary"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.threshold"):
        create_method({"name": "gkd", "threshold": 0.0}, _context())
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        create_method({"name": "gkd", "temperature": 0}, _context())
    with pytest.raises(ConfigError, match="method.warmup_epochs must be >= 0"):
        create_method({"name": "gkd", "warmup_epochs": -1.0}, _context())
