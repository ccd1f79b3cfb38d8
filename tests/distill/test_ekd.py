import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.ekd import threshold_ranks

LABELS = [0, 0, 1, 1, 2, 2]  # 3 positive pairs, 12 negative pairs
FPRS = [0.25, 0.1, 0.01]  # ranks 3 and 1 among 12 negatives; 0.01 cannot be resolved


def _context(classes: int = 3, dim: int = 3) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres)


def _method(**params):
    spec = {"name": "ekd", "fprs": FPRS, "temperature": 0.1, "topk": 5, "positive_weight": 1.0}
    spec.update(negative_weight=1.0, **params)
    return create_method(spec, _context())


def _pairs(x: torch.Tensor) -> tuple[list[float], list[float]]:
    x = F.normalize(x, dim=1).tolist()
    positive, negative = [], []
    for i in range(len(LABELS)):
        for j in range(i + 1, len(LABELS)):
            cos = sum(a * b for a, b in zip(x[i], x[j], strict=True))
            (positive if LABELS[i] == LABELS[j] else negative).append(cos)
    return positive, negative


def _naive_terms(student, teacher, s_tau, t_tau, topk=5, temperature=0.1):
    def count(x, taus):
        return sum(1 / (1 + math.exp(-(x - tau) / temperature)) for tau in taus)

    def mse(s_list, t_list):
        diffs = [(count(s, s_tau) - count(t, t_tau)) ** 2 for s, t in zip(s_list, t_list, strict=True)]
        return sum(diffs) / len(diffs)

    s_pos, s_neg = student
    t_pos, t_neg = teacher
    hardest = sorted(range(len(s_neg)), key=lambda k: -s_neg[k])[:topk]
    return mse(s_pos, t_pos), mse([s_neg[k] for k in hardest], [t_neg[k] for k in hardest])


def test_threshold_ranks() -> None:
    assert threshold_ranks(1000, [1e-1, 1e-2, 1e-3, 1e-4]) == [100, 10, 1, 0]
    assert threshold_ranks(30, [0.1]) == [3]  # 30 * 0.1 is 3.0000000000000004 in floating point
    assert threshold_ranks(12, FPRS) == [3, 1, 0]


def test_loss_and_thresholds_match_a_naive_computation_over_two_steps() -> None:
    generator = torch.Generator().manual_seed(1)
    method = _method(momentum=0.5)
    labels = torch.tensor(LABELS)
    s_tau, t_tau = None, None
    for step in range(2):
        student, teacher = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
        terms = method(student, labels, teacher)
        s_pairs, t_pairs = _pairs(student), _pairs(teacher)
        s_now = [sorted(s_pairs[1], reverse=True)[r] for r in (3, 1)]
        t_now = [sorted(t_pairs[1], reverse=True)[r] for r in (3, 1)]
        if step == 0:  # warm start: the first batch's thresholds
            s_tau, t_tau = s_now, t_now
        else:
            s_tau = [0.5 * a + 0.5 * b for a, b in zip(s_now, s_tau, strict=True)]
            t_tau = [0.5 * a + 0.5 * b for a, b in zip(t_now, t_tau, strict=True)]
        assert method.student_thresholds.tolist() == pytest.approx([*s_tau, 0.0], abs=1e-6)
        assert method.teacher_thresholds.tolist() == pytest.approx([*t_tau, 0.0], abs=1e-6)
        positive, negative = _naive_terms(s_pairs, t_pairs, s_tau, t_tau)
        assert terms["ekd_positive"].item() == pytest.approx(positive, rel=1e-4, abs=1e-7)
        assert terms["ekd_negative"].item() == pytest.approx(negative, rel=1e-4, abs=1e-7)
    assert method.thresholds_seen.tolist() == [True, True, False]
    frozen = method.student_thresholds.clone()
    method.eval()
    method(torch.randn(6, 3), labels, torch.randn(6, 3))
    assert torch.equal(method.student_thresholds, frozen)


def test_without_warm_start_thresholds_start_from_zero_like_the_reference() -> None:
    method = _method(momentum=0.01, warm_start=False)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    method(student, torch.tensor(LABELS), teacher)
    s_now = [sorted(_pairs(student)[1], reverse=True)[r] for r in (3, 1)]
    assert method.student_thresholds.tolist() == pytest.approx([0.01 * v for v in s_now] + [0.0], abs=1e-7)


def test_default_weights_and_a_batch_without_positive_pairs() -> None:
    method = create_method({"name": "ekd"}, _context(6))
    student = torch.randn(6, 3, requires_grad=True)
    terms = method(student, torch.arange(6), torch.randn(6, 3))
    assert terms["ekd_positive"].item() == 0.0
    # 15 negatives resolve only FPR 1e-1; the rest stay untouched.
    assert method.thresholds_seen.tolist() == [True] + [False] * 5
    sum(terms.values()).backward()
    assert torch.isfinite(student.grad).all()


def test_gradient_reaches_the_student_only() -> None:
    method = _method(head="frozen")
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(6, 3, requires_grad=True)
    teacher = torch.randn(6, 3, requires_grad=True)
    terms = method(student, torch.tensor(LABELS), teacher)
    (terms["ekd_positive"] + terms["ekd_negative"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not method.student_thresholds.requires_grad


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.fprs"):
        create_method({"name": "ekd", "fprs": [0.1, 0.0]}, _context())
    with pytest.raises(ConfigError, match="method.fprs"):
        create_method({"name": "ekd", "fprs": []}, _context())
    with pytest.raises(ConfigError, match="method.momentum"):
        create_method({"name": "ekd", "momentum": 0.0}, _context())
    with pytest.raises(ConfigError, match="method.topk"):
        create_method({"name": "ekd", "topk": 0}, _context())
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        create_method({"name": "ekd", "temperature": 0.0}, _context())
