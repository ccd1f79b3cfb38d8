import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method
from facedistill.distill.adadistill import _class_sums, adaptive_alpha, update_centres
from tests.multiprocess import spawn_world


def _context(centres: torch.Tensor) -> MethodContext:
    return MethodContext(num_classes=centres.shape[0], embedding_size=centres.shape[1], centres=centres)


def test_alpha_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    teacher = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    centres = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    # cos(s, t) = 0.6, 0.6, -0.6; cos(W, t) = 0.6, -0.8 (clamped to 1e-6), 0.6; products 0.36, 6e-7, -0.36,
    # clamped to [1e-6, 1].
    alpha = adaptive_alpha(student, teacher, centres)
    assert alpha.tolist() == pytest.approx([0.36, 1e-6, 1e-6], rel=1e-4)
    assert adaptive_alpha(student, teacher, centres, weighted=False).tolist() == pytest.approx([0.6, 0.6, 1e-6])


def test_centre_update_by_hand() -> None:
    centres = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    teacher = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    update_centres(centres, student, teacher, torch.tensor([0, 1, 1]))
    # Class 0: alpha = 0.6 * 0.6 = 0.36 -> 0.36 * (2, 0) + 0.64 * (0.6, 0.8).
    assert centres[0].tolist() == pytest.approx([0.72 + 0.384, 0.512], rel=1e-5)
    # Class 1, two samples from the same old centre (0, 1): alpha = 0 * 0 -> 1e-6 (pull onto (1, 0)), and
    # alpha = 1 * 1 = 1 (keep); the mean of the two updates.
    a = 1e-6
    expected = [(a * 0 + (1 - a) * 1 + 0) / 2, (a * 1 + 1) / 2]
    assert centres[1].tolist() == pytest.approx(expected, rel=1e-5)
    # A class outside the batch keeps its centre.
    assert centres[2].tolist() == [1.0, 1.0]


def test_class_sums_by_hand() -> None:
    sums = _class_sums(
        torch.tensor([5, 2, 5]),
        torch.tensor([0.5, 0.25, 1.0]),
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]),
        torch.tensor([2, 5, 9]),
    )
    expected = [[1.0, 0.25, 0.0, 0.75], [2.0, 1.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert sums.tolist() == expected


def test_loss_uses_the_updated_centres_and_only_the_student_gets_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 4, generator=generator), dim=1)
    method = create_method({"name": "adadistill", "scale": 4.0}, _context(centres))
    assert not any(p.requires_grad for p in method.parameters())
    student = torch.randn(4, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 4, generator=generator)
    labels = torch.tensor([0, 0, 2, 1])

    expected_centres = centres.clone()
    update_centres(expected_centres, student.detach(), teacher, labels)
    loss = method(student, labels, teacher)["arcface"]
    assert torch.allclose(method.head.weight, expected_centres)
    cos = F.normalize(student.detach(), dim=1) @ F.normalize(expected_centres, dim=1).T
    logits = cos.clone()
    for i, y in enumerate(labels.tolist()):
        logits[i, y] = math.cos(math.acos(cos[i, y].item()) + 0.5)
    assert loss.item() == pytest.approx(F.cross_entropy(4 * logits, labels).item(), rel=1e-4)

    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    method.eval()
    method(student, labels, teacher)
    assert torch.allclose(method.head.weight, expected_centres)  # no update outside training


def test_cos_variant_subtracts_the_cosface_margin() -> None:
    method = create_method({"name": "adadistill", "variant": "cos", "scale": 1.0}, _context(torch.eye(2)))
    student, teacher = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.6, 0.8]])
    loss = method(student, torch.tensor([1]), teacher)["cosface"]
    # alpha = 1 * 0.8: W_1 = 0.8 * (0, 1) + 0.2 * (0.6, 0.8) = (0.12, 0.96); cos(s, W_1) = (0.072 + 0.768) / |W_1|.
    cos_1 = (0.072 + 0.768) / math.hypot(0.12, 0.96)
    logits = [0.6, cos_1 - 0.35]
    expected = -logits[1] + math.log(sum(math.exp(z) for z in logits))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# Two ranks, class 0 on both with different samples, class 1 only on rank 0 and class 2 only on rank 1.
CENTRES = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0]]), dim=1)
STUDENT = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.3, 0.0], [0.1, 0.9, 0.2], [1.0, 0.0, 0.1], [0.3, 0.3, 0.9]])
TEACHER = torch.tensor([[1.0, 0.3, 0.1], [0.7, 0.5, 0.2], [0.2, 1.0, 0.4], [0.9, 0.2, 0.3], [0.4, 0.6, 0.7]])
LABELS = torch.tensor([0, 0, 1, 0, 2])
SHARDS = [[0, 1, 2], [3, 4]]  # unequal batch sizes on purpose


def _update_once(rank: int, out: str) -> None:
    method = create_method({"name": "adadistill"}, _context(CENTRES))
    rows = SHARDS[rank]
    method(STUDENT[rows], LABELS[rows], TEACHER[rows])
    torch.save(method.head.weight.clone(), f"{out}/rank{rank}.pt")


def _worker(rank: int, ports: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        _update_once(rank, out)  # returns before the group goes, with everything that used it
    finally:
        dist.destroy_process_group()


def test_two_processes_apply_one_identical_update_from_the_union_of_their_samples(tmp_path: Path) -> None:
    spawn_world(_worker, (str(tmp_path),), 2, tmp_path, timeout_s=120)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = CENTRES.clone()
    update_centres(single, STUDENT, TEACHER, LABELS)
    assert torch.equal(rank0, rank1)
    assert torch.allclose(rank0, single, atol=1e-6)
    assert not torch.allclose(single[:3], CENTRES[:3])
    # What the reference gets on rank 0 (its own samples only) differs: the ranks would drift apart.
    local = CENTRES.clone()
    update_centres(local, STUDENT[SHARDS[0]], TEACHER[SHARDS[0]], LABELS[SHARDS[0]])
    assert not torch.allclose(local, single)
    assert torch.equal(single[3], CENTRES[3])


def test_bad_hyper_parameters_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method.variant"):
        create_method({"name": "adadistill", "variant": "sphere"}, _context(torch.eye(2)))
    with pytest.raises(ConfigError, match="method.margin"):
        create_method({"name": "adadistill", "margin": -0.5}, _context(torch.eye(2)))
    with pytest.raises(ConfigError, match="method.weighted_alpha"):
        create_method({"name": "adadistill", "weighted_alpha": 1}, _context(torch.eye(2)))
