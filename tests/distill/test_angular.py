import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method, embedding  # noqa: F401  (registers embedding)
from facedistill.distill.angular import AngularParams


def _context(classes: int = 3, dim: int = 4) -> MethodContext:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return MethodContext(num_classes=classes, embedding_size=dim, centres=centres)


def test_defaults_are_the_official_comparison() -> None:
    params = AngularParams()
    assert (params.scale, params.margin, params.alpha) == (64.0, 0.5, 1.0)


def test_angular_term_is_alpha_times_one_minus_cos() -> None:
    method = create_method({"name": "angular", "alpha": 0.5}, _context(2, 2))
    student = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    # 1 - cos: 1 - 0.6 = 0.4 and 1 - (-1) = 2; mean 1.2; times alpha.
    assert method(student, torch.tensor([0, 1]), teacher)["angular"].item() == pytest.approx(0.6, rel=1e-5)


def test_centres_are_learnable_and_not_the_teachers() -> None:
    context = _context()
    method = create_method({"name": "angular"}, context)
    assert method.head.weight.requires_grad
    assert not torch.allclose(F.normalize(method.head.weight.detach(), dim=1), context.centres)
    student = torch.randn(2, 4, requires_grad=True)
    sum(method(student, torch.tensor([0, 1]), torch.randn(2, 4)).values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert method.head.weight.grad is not None and method.head.weight.grad.abs().sum() > 0


def test_same_loss_as_embedding_cosine_with_a_learnable_head() -> None:
    context = _context()
    angular = create_method({"name": "angular"}, context)
    generic = create_method({"name": "embedding", "loss": "cosine", "head": "learnable"}, context)
    generic.head.weight.data.copy_(angular.head.weight.data)
    student, teacher, labels = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    a, b = angular(student, labels, teacher), generic(student, labels, teacher)
    assert a["arcface"].item() == pytest.approx(b["arcface"].item(), rel=1e-6)
    assert a["angular"].item() == pytest.approx(b["embedding"].item(), rel=1e-6)


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.alpha must be >= 0"):
        create_method({"name": "angular", "alpha": -1.0}, _context())
    with pytest.raises(ConfigError, match="method: unknown key"):
        create_method({"name": "angular", "head": "frozen"}, _context())
