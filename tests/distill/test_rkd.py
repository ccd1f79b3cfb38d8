import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.rkd import pairwise_euclidean, rkd_angle, rkd_distance

STUDENT = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 2.0]]
TEACHER = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _naive_distance(s: list[list[float]], t: list[list[float]]) -> float:
    n = len(s)

    def normalised(points: list[list[float]]) -> list[list[float]]:
        d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
        positive = [v for row in d for v in row if v > 0]
        mean = sum(positive) / len(positive)
        return [[v / mean for v in row] for row in d]

    ds, dt = normalised(s), normalised(t)
    return sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _naive_angle(s: list[list[float]], t: list[list[float]]) -> float:
    n = len(s)

    def cos_at(points: list[list[float]], i: int, j: int, k: int) -> float:
        u = [points[j][0] - points[i][0], points[j][1] - points[i][1]]
        v = [points[k][0] - points[i][0], points[k][1] - points[i][1]]
        nu, nv = math.hypot(*u), math.hypot(*v)
        if nu == 0 or nv == 0:
            return 0.0  # a zero difference normalises to the zero vector
        return (u[0] * v[0] + u[1] * v[1]) / (nu * nv)

    total = sum(_huber(cos_at(s, i, j, k) - cos_at(t, i, j, k)) for i in range(n) for j in range(n) for k in range(n))
    return total / n**3


def test_distance_and_angle_terms_match_naive_loops() -> None:
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert rkd_distance(s, t).item() == pytest.approx(_naive_distance(STUDENT, TEACHER), rel=1e-5)
    assert rkd_angle(s, t).item() == pytest.approx(_naive_angle(STUDENT, TEACHER), rel=1e-5)


def test_distance_term_by_hand_on_three_points() -> None:
    # Student distances 1, 1, sqrt2 (mean (2 + sqrt2) / 3); teacher 2, 1, sqrt5 (mean (3 + sqrt5) / 3).
    s, t = torch.tensor(STUDENT[:3]), torch.tensor(TEACHER[:3])
    ms, mt = (2 + math.sqrt(2)) / 3, (3 + math.sqrt(5)) / 3
    pairs = [(1 / ms, 2 / mt), (1 / ms, 1 / mt), (math.sqrt(2) / ms, math.sqrt(5) / mt)]
    expected = 2 * sum(_huber(a - b) for a, b in pairs) / 9
    assert rkd_distance(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_relations_are_scale_invariant() -> None:
    t = torch.tensor(TEACHER)
    assert rkd_distance(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)


def _context(classes: int = 3, dim: int = 2) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres)


def test_method_weights_terms_25_and_50_and_normalises_by_default() -> None:
    method = create_method({"name": "rkd"}, _context())
    s, t = torch.tensor(STUDENT[1:]), torch.tensor(TEACHER[1:])
    terms = method(s, torch.tensor([0, 1, 2]), t)
    su, tu = F.normalize(s, dim=1), F.normalize(t, dim=1)
    assert terms["rkd_distance"].item() == pytest.approx(25 * rkd_distance(su, tu).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(50 * rkd_angle(su, tu).item(), rel=1e-5)
    raw = create_method({"name": "rkd", "normalize": False}, _context())
    assert raw(s, torch.tensor([0, 1, 2]), t)["rkd_angle"].item() == pytest.approx(50 * rkd_angle(s, t).item())


def test_gradients_are_finite_with_coincident_rows_and_reach_the_student_only() -> None:
    method = create_method({"name": "rkd", "head": "frozen"}, _context())
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.5, 0.8]], requires_grad=True)
    terms = method(student, torch.tensor([0, 0, 1, 2]), teacher)
    (terms["rkd_distance"] + terms["rkd_angle"]).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert torch.equal(pairwise_euclidean(student.detach()).diagonal(), torch.zeros(4))


def test_bad_inputs_and_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.angle_weight must be >= 0"):
        create_method({"name": "rkd", "angle_weight": -1.0}, _context())
    with pytest.raises(ConfigError, match="method.normalize"):
        create_method({"name": "rkd", "normalize": "yes"}, _context())
    method = create_method({"name": "rkd"}, _context())
    with pytest.raises(ValueError, match="at least 2 images"):
        method(torch.randn(1, 2), torch.tensor([0]), torch.randn(1, 2))
