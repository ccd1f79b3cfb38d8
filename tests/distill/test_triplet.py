import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.triplet import teacher_margins, triplet_distillation


def _circle(angles: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


STUDENT_ANGLES = [0.0, 0.9, 1.1, 1.5, 0.3]
TEACHER_ANGLES = [0.0, 0.1, 1.2, 1.6, 0.5]
LABELS = [0, 0, 1, 1, 2]  # identity 2 has no positive: it is only ever a negative


def _distance(a: float, b: float, kind: str) -> float:
    cos = math.cos(a - b)
    return 2 - 2 * cos if kind == "l2" else math.acos(max(-1.0, min(1.0, cos)))


def _naive(kind: str, mining: str, m_min: float = 0.2, m_max: float = 0.5) -> float:
    """Deliberately plain loops over the batch."""
    n = len(LABELS)
    triplets = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and LABELS[p] == LABELS[a]]
        negatives = [q for q in range(n) if LABELS[q] != LABELS[a]]
        if not positives or not negatives:
            continue
        if mining == "all":
            triplets += [(a, p, q) for p, q in itertools.product(positives, negatives)]
        else:
            p = max(positives, key=lambda j: _distance(STUDENT_ANGLES[a], STUDENT_ANGLES[j], kind))
            q = min(negatives, key=lambda j: _distance(STUDENT_ANGLES[a], STUDENT_ANGLES[j], kind))
            triplets.append((a, p, q))
    gaps = []
    for a, p, q in triplets:
        t = TEACHER_ANGLES
        gaps.append(max(0.0, _distance(t[a], t[q], kind) - _distance(t[a], t[p], kind)))
    losses = []
    for (a, p, q), gap in zip(triplets, gaps, strict=True):
        margin = (m_max - m_min) * gap / max(gaps) + m_min
        s = STUDENT_ANGLES
        losses.append(max(0.0, _distance(s[a], s[p], kind) - _distance(s[a], s[q], kind) + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("mining", ["hardest", "all"])
def test_matches_a_naive_loop(kind: str, mining: str) -> None:
    loss = triplet_distillation(
        3 * _circle(STUDENT_ANGLES), _circle(TEACHER_ANGLES), torch.tensor(LABELS), 0.2, 0.5, kind, mining
    )
    assert loss.item() == pytest.approx(_naive(kind, mining), rel=1e-4)


def test_hardest_l2_by_hand() -> None:
    # Two identities, two images each, on the unit circle; l2 distance = 2 - 2 cos(angle difference).
    student = _circle([0.0, 0.5, 0.6, 2.0])
    teacher = _circle([0.0, 0.2, 1.0, 2.0])
    loss = triplet_distillation(student, teacher, torch.tensor([0, 0, 1, 1]), 0.2, 0.5, "l2", "hardest")

    def d(x: float) -> float:
        return 2 - 2 * math.cos(x)

    # Anchor 0: p=1, hardest negative 2 (0.6). Anchor 1: p=0, n=2 (0.1). Anchor 2: p=3, n=1 (0.1). Anchor 3: p=2,
    # n=1 (1.5). Teacher gaps use the teacher's angles for the same triplets.
    triplets = [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]
    s, t = [0.0, 0.5, 0.6, 2.0], [0.0, 0.2, 1.0, 2.0]
    gaps = [max(0.0, d(t[a] - t[n]) - d(t[a] - t[p])) for a, p, n in triplets]
    margins = [0.3 * g / max(gaps) + 0.2 for g in gaps]
    expected = (
        sum(max(0.0, d(s[a] - s[p]) - d(s[a] - s[n]) + m) for (a, p, n), m in zip(triplets, margins, strict=True)) / 4
    )
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_teacher_margins_are_normalised_and_guarded() -> None:
    margins = teacher_margins(torch.tensor([0.4, 0.2, -0.1]), 0.2, 0.5)
    assert torch.allclose(margins, torch.tensor([0.5, 0.35, 0.2]))
    # The reference divides by a zero max here (NaN); we fall back to m_min.
    assert torch.allclose(teacher_margins(torch.tensor([-0.3, 0.0]), 0.2, 0.5), torch.tensor([0.2, 0.2]))


def _context(classes: int = 4, dim: int = 3) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres)


def test_batch_without_positive_pairs_gives_an_exact_zero_that_still_backpropagates() -> None:
    method = create_method({"name": "triplet", "arcface_weight": 0.0}, _context())
    student = torch.randn(4, 3, requires_grad=True)
    terms = method(student, torch.tensor([0, 1, 2, 3]), torch.randn(4, 3))
    assert set(terms) == {"triplet"} and terms["triplet"].item() == 0.0
    sum(terms.values()).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_gradient_reaches_the_student_only() -> None:
    method = create_method({"name": "triplet", "head": "frozen"}, _context())
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    terms = method(student, torch.tensor([0, 0, 1, 1]), teacher)
    assert set(terms) == {"triplet", "arcface"}
    terms["triplet"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="m_min <= m_max"):
        create_method({"name": "triplet", "m_min": 0.6}, _context())
    with pytest.raises(ConfigError, match="method.mining"):
        create_method({"name": "triplet", "mining": "semihard"}, _context())
    with pytest.raises(ConfigError, match="method.distance"):
        create_method({"name": "triplet", "distance": "l1"}, _context())
    with pytest.raises(ConfigError, match="method.arcface_weight must be >= 0"):
        create_method({"name": "triplet", "arcface_weight": -1.0}, _context())
