import math

import pytest
import torch
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import METHODS, MethodContext, create_method, method_params
from facedistill.distill.margin_distillation import per_sample_margins

C = torch.tensor([0.8, 0.4, 0.0, -0.4])


def test_official_formula_uses_batch_max_without_clamp() -> None:
    margins = per_sample_margins(C, 0.2, 0.5, clamp=False, guard=False)
    # ratio c / max = [1, 0.5, 0, -0.5] -> 0.3 * ratio + 0.2
    assert torch.allclose(margins, torch.tensor([0.5, 0.35, 0.2, 0.05]))


def test_clamp_keeps_margins_within_bounds() -> None:
    margins = per_sample_margins(C, 0.2, 0.5, clamp=True)
    assert torch.allclose(margins, torch.tensor([0.5, 0.35, 0.2, 0.2]))


def test_non_positive_max_is_guarded() -> None:
    negative = torch.tensor([-0.2, -0.4])
    assert torch.allclose(per_sample_margins(negative, 0.2, 0.5, guard=True), torch.tensor([0.2, 0.2]))
    # The reference divides by the negative max: margins grow beyond m_max for the least typical image.
    unguarded = per_sample_margins(negative, 0.2, 0.5, clamp=False, guard=False)
    assert torch.allclose(unguarded, torch.tensor([0.5, 0.8]))
    zero = torch.tensor([0.0, -0.1])
    assert torch.allclose(per_sample_margins(zero, 0.2, 0.5), torch.tensor([0.2, 0.2]))
    assert not torch.isfinite(per_sample_margins(zero, 0.2, 0.5, clamp=False, guard=False)).all()


def test_dataset_normaliser_makes_margins_independent_of_the_batch() -> None:
    alone = per_sample_margins(torch.tensor([0.4]), 0.2, 0.5, normaliser=0.8)
    together = per_sample_margins(torch.tensor([0.4, 0.6]), 0.2, 0.5, normaliser=0.8)
    assert alone[0].item() == pytest.approx(0.35) and together[0].item() == pytest.approx(0.35)
    # With the batch max the same image's margin changes with its neighbours.
    assert per_sample_margins(torch.tensor([0.4]), 0.2, 0.5)[0].item() == pytest.approx(0.5)


def _context(centres: torch.Tensor, typicality: torch.Tensor | None = None) -> MethodContext:
    return MethodContext(
        num_classes=centres.shape[0], embedding_size=centres.shape[1], centres=centres, typicality=typicality
    )


def test_loss_equals_hand_built_arcface_with_per_sample_margins() -> None:
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 8), dim=1)
    typicality = torch.tensor([[0.9, 0.85], [0.5, 0.4]])
    method = create_method({"name": "margin_distillation", "scale": 64.0}, _context(centres, typicality))
    student = torch.randn(4, 8)
    teacher = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    loss = method(student, labels, teacher)["margin_arcface"]

    c = (F.normalize(teacher, dim=1) * centres[labels]).sum(1)
    m = 0.3 * (c / 0.9).clamp(0, 1) + 0.2
    cos = F.normalize(student, dim=1) @ centres.T
    logits = cos.clone()
    for i, label in enumerate(labels):
        logits[i, label] = math.cos(math.acos(cos[i, label].item()) + m[i].item())
    expected = F.cross_entropy(64 * logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_embedding_weight_adds_the_cosine_distance_to_the_teacher() -> None:
    torch.manual_seed(1)
    centres = F.normalize(torch.randn(5, 8), dim=1)
    typicality = torch.tensor([[0.9, 0.85]])
    student, teacher, labels = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    margin_only = {"name": "margin_distillation", "kd_weight": 0.0}
    plain = create_method(margin_only, _context(centres, typicality))(student, labels, teacher)
    assert set(plain) == {"margin_arcface"}
    spec = {**margin_only, "embedding_weight": 0.5}
    both = create_method(spec, _context(centres, typicality))(student, labels, teacher)
    cosine = (F.normalize(student, dim=1) * F.normalize(teacher, dim=1)).sum(1)
    assert both["embedding"].item() == pytest.approx(0.5 * (1 - cosine).mean().item(), rel=1e-5)
    assert both["margin_arcface"].item() == pytest.approx(plain["margin_arcface"].item())
    with pytest.raises(ValueError, match="embedding_weight must be >= 0"):
        create_method({**spec, "embedding_weight": -1.0}, _context(centres, typicality))


def test_centres_are_frozen_and_sizes_checked() -> None:
    centres = F.normalize(torch.randn(3, 4), dim=1)
    method = create_method({"name": "margin_distillation", "normaliser": "batch"}, _context(centres))
    assert not any(p.requires_grad for p in method.parameters())
    with pytest.raises(ValueError, match="expected \\(3, 8\\)"):
        create_method(
            {"name": "margin_distillation", "normaliser": "batch"},
            MethodContext(num_classes=3, embedding_size=8, centres=centres),
        )


def test_bad_hyper_parameters_are_clear_errors() -> None:
    centres = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ConfigError, match="method: unknown key"):
        create_method({"name": "margin_distillation", "m_mni": 0.1}, _context(centres))
    with pytest.raises(ValueError, match="m_min <= m_max"):
        create_method({"name": "margin_distillation", "m_min": 0.6, "normaliser": "batch"}, _context(centres))
    with pytest.raises(ValueError, match="needs a teacher"):
        create_method({"name": "margin_distillation"}, MethodContext(3, 4))
    with pytest.raises(ConfigError, match="unknown method .nope.; known: .*arcface"):
        create_method({"name": "nope"}, _context(centres))


def test_registry_lists_the_methods() -> None:
    assert {"arcface", "margin_distillation"} <= set(METHODS.names())


def test_kd_weight_adds_hintons_soft_logit_term_over_the_frozen_centres() -> None:
    torch.manual_seed(2)
    centres = F.normalize(torch.randn(5, 8), dim=1)
    typicality = torch.tensor([[0.9, 0.85]])
    student, teacher, labels = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    margin_only = {"name": "margin_distillation", "kd_weight": 0.0}
    plain = create_method(margin_only, _context(centres, typicality))(student, labels, teacher)
    spec = {"name": "margin_distillation", "scale": 32.0, "kd_weight": 2.0, "temperature": 3.0}
    both = create_method(spec, _context(centres, typicality))(student, labels, teacher)
    # By hand: p = softmax(32 cos(., W) / 3) for both nets, KL(p_t || p_s) summed over classes, batch mean, x T^2.
    p_s = torch.softmax(32 * F.normalize(student, dim=1) @ centres.T / 3, dim=1)
    p_t = torch.softmax(32 * F.normalize(teacher, dim=1) @ centres.T / 3, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert both["kd"].item() == pytest.approx(2.0 * 9.0 * kl.item(), rel=1e-4)
    rescaled = create_method({**margin_only, "scale": 32.0}, _context(centres, typicality))
    assert both["margin_arcface"].item() == pytest.approx(rescaled(student, labels, teacher)["margin_arcface"].item())
    assert "kd" not in plain
    with pytest.raises(ValueError, match="temperature must be > 0"):
        create_method({**spec, "temperature": 0.0}, _context(centres, typicality))


def test_the_head_is_sharded_over_processes_with_or_without_the_kd_term() -> None:
    method_cls, params = method_params({"name": "margin_distillation"})
    assert method_cls.head_can_shard(params)
    assert method_cls.head_can_shard(method_params({"name": "margin_distillation", "kd_weight": 1.0})[1])
    assert not METHODS.get("kd").head_can_shard(method_params({"name": "kd"})[1])
