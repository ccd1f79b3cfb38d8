"""The ``official`` preset against an independent reference written from the official code's formula.

david-svitov/margindistillation, ``train/train.py``: centres W = the teacher's fc7, L2-normalised and frozen;
c_i = <t_i / |t_i|, W_{y_i}>; Dmax = max c over each GPU's own share of the batch; m_i = (Mmax - Mmin) c_i / Dmax +
Mmin with no clamp and no guard; true-class logit s cos(arccos(cos theta_i) + m_i), nothing special past pi; mean
cross-entropy; s 64, Mmax 0.5, Mmin 0.2. ``official_loss`` below computes exactly that with plain torch ops and
shares no code with facedistill.
"""

from __future__ import annotations

import math

import pytest
import torch

from facedistill.config import ConfigError
from facedistill.distill import MethodContext, create_method, method_params
from facedistill.distill.margin_distillation import PRESETS
from facedistill.heads import MarginHead
from facedistill.heads.partial_fc import FrozenPartialFC
from tests.helpers import gloo_world

C, D = 7, 6
WORLD, B_LOCAL = 2, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}


def official_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, fc7: torch.Tensor
) -> torch.Tensor:
    """The official MarginDistillation loss of one GPU's batch, from its formula (no facedistill code)."""
    s, m_max, m_min = 64.0, 0.5, 0.2
    weight = fc7 / fc7.norm(dim=1, keepdim=True)
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    cos = x @ weight.T
    t = teacher / teacher.norm(dim=1, keepdim=True)
    c = (t * weight[labels]).sum(dim=1)
    margin = (m_max - m_min) * c / c.max() + m_min
    one_hot = torch.zeros_like(cos).scatter_(1, labels[:, None], 1.0)
    target = torch.cos(torch.acos(cos.gather(1, labels[:, None]).squeeze(1)) + margin)
    logits = s * (cos * (1 - one_hot) + target[:, None] * one_hot)
    return -(logits.log_softmax(dim=1) * one_hot).sum(dim=1).mean()


def _batch(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch whose first row sits past pi (theta + m > pi) and whose second has a negative teacher cosine."""
    generator = torch.Generator().manual_seed(seed)
    fc7 = torch.randn(C, D, generator=generator)
    labels = torch.randint(0, C, (size,), generator=generator)
    embeddings = torch.randn(size, D, generator=generator)
    teacher = torch.randn(size, D, generator=generator)
    unit = fc7 / fc7.norm(dim=1, keepdim=True)
    embeddings[0] = -unit[labels[0]] + 0.05 * torch.randn(D, generator=generator)  # theta close to pi
    teacher[0] = unit[labels[0]] + 0.3 * torch.randn(D, generator=generator)  # typical: a large margin
    if size > 1:
        teacher[1] = -unit[labels[1]] + 0.3 * torch.randn(D, generator=generator)  # c < 0: margin below m_min
    return {"fc7": fc7, "labels": labels, "embeddings": embeddings, "teacher": teacher}


def _facedistill(batch: dict[str, torch.Tensor], local: bool, **extra: object) -> tuple[torch.Tensor, torch.Tensor]:
    unit = batch["fc7"] / batch["fc7"].norm(dim=1, keepdim=True)
    context = MethodContext(C, D, centres=None if local else unit, local_centres=unit if local else None)
    method = create_method({"name": "margin_distillation", "preset": "official", **extra}, context)
    assert isinstance(method.head, FrozenPartialFC if local else MarginHead)
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    loss = sum(method(embeddings, batch["labels"], batch["teacher"]).values())
    loss.backward()
    return loss.detach(), embeddings.grad


def _reference(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    loss = official_loss(embeddings, batch["labels"], batch["teacher"], batch["fc7"])
    loss.backward()
    return loss.detach(), embeddings.grad


@pytest.mark.parametrize("local", [False, True], ids=["MarginHead", "FrozenPartialFC"])
@pytest.mark.parametrize("size", [8, 1])
def test_official_preset_equals_the_official_formula(size: int, local: bool) -> None:
    batch = _batch(size)
    unit = batch["fc7"] / batch["fc7"].norm(dim=1, keepdim=True)
    cos0 = float((batch["embeddings"][0] / batch["embeddings"][0].norm()) @ unit[batch["labels"][0]])
    assert math.acos(cos0) + 0.2 > math.pi  # the first row is past pi at any margin
    if size > 1:
        assert float((batch["teacher"][1] / batch["teacher"][1].norm()) @ unit[batch["labels"][1]]) < 0
    loss, grad = _facedistill(batch, local)
    expected_loss, expected_grad = _reference(batch)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


def test_the_validated_preset_differs_past_pi_and_explicit_keys_override_a_preset() -> None:
    batch = _batch(8)
    official, _ = _facedistill(batch, local=False)
    continued, _ = _facedistill(batch, local=False, past_pi="continue")
    # Row 0 is past pi: there the official logit turns back up (a smaller loss), facedistill's keeps falling.
    assert continued > official + 1e-3
    _, params = method_params({"name": "margin_distillation", "preset": "official", "clamp": True})
    assert params.clamp is True and params.guard is False and params.normaliser == "local_batch"
    _, default = method_params({"name": "margin_distillation"})
    assert {key: getattr(default, key) for key in PRESETS["facedistill"]} == PRESETS["facedistill"]
    assert default.preset == "facedistill" and default.kd_weight == 1.0 and default.mirror_rows


def test_an_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"method.preset: 'paper' is not one of 'facedistill', 'official'"):
        method_params({"name": "margin_distillation", "preset": "paper"})


def test_the_official_preset_reads_the_teacher_row_of_the_original_image_for_a_mirror() -> None:
    _, official = method_params({"name": "margin_distillation", "preset": "official"})
    assert official.mirror_rows is False and official.kd_weight == 0.0 and official.past_pi == "cos"


def _rank_results(rank: int) -> dict[str, object]:
    batch = _batch(WORLD * B_LOCAL, seed=3)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    unit = batch["fc7"] / batch["fc7"].norm(dim=1, keepdim=True)
    context = MethodContext(C, D, centres=unit, shard_heads=True)
    method = create_method({"name": "margin_distillation", "preset": "official"}, context)
    assert isinstance(method.head, FrozenPartialFC) and method.head.distributed
    embeddings = batch["embeddings"][rows].clone().requires_grad_(True)
    margins = method.margins(batch["teacher"][rows], batch["labels"][rows])
    loss = sum(method(embeddings, batch["labels"][rows], batch["teacher"][rows]).values())
    loss.backward()
    return {"loss": float(loss), "grad": embeddings.grad.tolist(), "margins": margins.tolist()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return gloo_world(_rank_results, WORLD, tmp_path_factory.mktemp("official"))


def test_two_processes_take_each_ones_own_dmax_as_the_official_code_does(world: list[dict]) -> None:
    """The official multi-GPU loss: each GPU's share with its own Dmax, the shares' losses averaged."""
    batch = _batch(WORLD * B_LOCAL, seed=3)
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    shares = [slice(r * B_LOCAL, (r + 1) * B_LOCAL) for r in range(WORLD)]
    loss = (
        sum(
            official_loss(embeddings[rows], batch["labels"][rows], batch["teacher"][rows], batch["fc7"])
            for rows in shares
        )
        / WORLD
    )
    loss.backward()
    loss = loss.detach()
    unit = batch["fc7"] / batch["fc7"].norm(dim=1, keepdim=True)
    for rank, rows in enumerate(shares):
        assert world[rank]["loss"] == pytest.approx(float(loss), rel=1e-5)
        # The sharded head scales its embedding gradient by the world size for DDP's average (undo_ddp_average).
        torch.testing.assert_close(torch.tensor(world[rank]["grad"]) / WORLD, embeddings.grad[rows], **TOL)
        t = batch["teacher"][rows] / batch["teacher"][rows].norm(dim=1, keepdim=True)
        c = (t * unit[batch["labels"][rows]]).sum(dim=1)
        torch.testing.assert_close(torch.tensor(world[rank]["margins"]), 0.3 * c / c.max() + 0.2, **TOL)
    # The two shares' maxima differ, so a global max would have given other margins.
    teacher = batch["teacher"] / batch["teacher"].norm(dim=1, keepdim=True)
    c = (teacher * unit[batch["labels"]]).sum(dim=1)
    assert abs(float(c[shares[0]].max()) - float(c[shares[1]].max())) > 1e-3
