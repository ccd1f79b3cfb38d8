import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.embedding import embedding_distance


def _context(classes: int = 2, dim: int = 2) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres)


STUDENT = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # unit: (0.6, 0.8), (0, -1)
TEACHER = torch.tensor([[1.0, 0.0], [0.0, -5.0]])  # unit: (1, 0), (0, -1)


def test_distances_match_hand_values() -> None:
    # |(0.6, 0.8) - (1, 0)|^2 = 0.16 + 0.64 = 0.8; 1 - cos = 0.4; identical directions give 0.
    assert torch.allclose(embedding_distance(STUDENT, TEACHER, "l2"), torch.tensor([0.8, 0.0]), atol=1e-6)
    assert torch.allclose(embedding_distance(STUDENT, TEACHER, "cosine"), torch.tensor([0.4, 0.0]), atol=1e-6)


@pytest.mark.parametrize(("loss", "expected"), [("l2", 0.4), ("cosine", 0.2)])
def test_term_is_weighted_batch_mean(loss: str, expected: float) -> None:
    method = create_method({"name": "embedding", "loss": loss, "weight": 2.0}, _context())
    terms = method(STUDENT, torch.tensor([0, 1]), TEACHER)
    assert terms["embedding"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    assert set(terms) == {"arcface", "embedding"}


def test_frozen_head_has_no_parameters_and_learnable_head_trains() -> None:
    context = _context(3, 4)
    frozen = create_method({"name": "embedding", "head": "frozen"}, context)
    assert not any(p.requires_grad for p in frozen.parameters())
    learnable = create_method({"name": "embedding", "head": "learnable"}, context)
    student = torch.randn(2, 4, requires_grad=True)
    terms = learnable(student, torch.tensor([0, 1]), torch.randn(2, 4))
    sum(terms.values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert learnable.head.weight.grad is not None


def test_gradient_reaches_the_student_only() -> None:
    method = create_method({"name": "embedding"}, _context(3, 4))
    student = torch.randn(2, 4, requires_grad=True)
    teacher = torch.randn(2, 4, requires_grad=True)
    method(student, torch.tensor([0, 1]), teacher)["embedding"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.loss"):
        create_method({"name": "embedding", "loss": "l1"}, _context())
    with pytest.raises(ConfigError, match="method.head"):
        create_method({"name": "embedding", "head": "teacher"}, _context())
    with pytest.raises(ConfigError, match="method.weight must be >= 0"):
        create_method({"name": "embedding", "weight": -1.0}, _context())
