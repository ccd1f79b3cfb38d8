"""FrozenPartialFC: MarginDistillation with sharded, sampled, frozen centres, against single-process references.

The two-rank checks run in one spawned gloo world; each rank writes what it computed, and the tests compare it
with the single-process computation (``MarginHead``'s margin and kd terms) on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facedistill.distill.base import MethodContext
from facedistill.distill.margin_distillation import MarginDistillation, MarginDistillationParams
from facedistill.heads import MarginHead
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import shard_range
from tests.helpers import gloo_world

WORLD = 2
C, D, B_LOCAL, IN = 11, 6, 4, 5
SCALE, TEMPERATURE = 16.0, 3.0
RATE = 0.7
TOL = {"atol": 2e-5, "rtol": 2e-5}


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.randn(WORLD * B_LOCAL, IN, generator=generator),
        "teacher": torch.randn(WORLD * B_LOCAL, D, generator=generator),
        "centres": F.normalize(torch.randn(C, D, generator=generator), dim=1),
        "labels": torch.tensor([3, 9, 9, 0, 5, 10, 1, 3]),
        "margins": 0.2 + 0.3 * torch.rand(WORLD * B_LOCAL, generator=generator),
    }


def _backbone() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(IN, D)


def _params(**extra: object) -> MarginDistillationParams:
    return MarginDistillationParams(scale=SCALE, normaliser="batch", kd_weight=0.7, temperature=TEMPERATURE, **extra)


def _reference_md() -> tuple[float, dict[str, torch.Tensor]]:
    """MarginDistillation + the angle term on one process: MarginHead's terms."""
    data = _data()
    backbone = _backbone()
    method = MarginDistillation(_params(), MethodContext(C, D, centres=data["centres"]))
    assert isinstance(method.head, MarginHead)
    terms = method(backbone(data["inputs"]), data["labels"], data["teacher"])
    loss = sum(terms.values())
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in backbone.named_parameters()}


def _rank_results(rank: int) -> dict[str, object]:
    results: dict[str, object] = {}
    data = _data()
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    # 1. sample_rate 1: the two-process method equals the one-process one (loss and backbone gradients).
    backbone = DistributedDataParallel(_backbone())
    context = MethodContext(C, D, centres=data["centres"], shard_heads=True)
    method = MarginDistillation(_params(centre_dtype="float32"), context)
    assert isinstance(method.head, FrozenPartialFC)
    terms = method(backbone(data["inputs"][rows]), data["labels"][rows], data["teacher"][rows])
    loss = sum(terms.values())
    loss.backward()
    results["md_loss"] = float(loss.detach())
    results["md_grads"] = {name: p.grad.tolist() for name, p in backbone.module.named_parameters()}
    # 2. sample_rate < 1: which columns each rank scored, and the loss over them.
    start, end = shard_range(C, rank, WORLD)
    torch.manual_seed(100 + rank)
    head = FrozenPartialFC(C, data["centres"][start:end], SCALE, m2=0.3, sample_rate=RATE, dtype=torch.float32)
    embeddings = data["teacher"].flip(0)[rows].clone()
    sampled = head(embeddings, data["labels"][rows], data["margins"][rows], data["teacher"][rows], TEMPERATURE)
    results["sampled_columns"] = (head.last_columns + start).tolist()
    results["sampled_margin"] = float(sampled["margin"])
    results["sampled_kd"] = float(sampled["kd"])
    # 3. The embedding gradients of both terms under an outer autocast, and without.
    results["autocast_grads"] = {
        f"{term}/{rate}/{dtype}": _term_gradient(rank, term, rate, dtype).tolist()
        for term in ("margin", "kd")
        for rate in (1.0, RATE)
        for dtype in (None, *AUTOCAST_DTYPES)
    }
    return results


def _cpu_autocast_lowers_to(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


# The lower precisions CPU autocast supports in this torch (float16 only in recent ones).
AUTOCAST_DTYPES = tuple(dtype for dtype in (torch.bfloat16, torch.float16) if _cpu_autocast_lowers_to(dtype))


def _term_gradient(rank: int | None, term: str, rate: float, autocast: torch.dtype | None) -> torch.Tensor:
    """The gradient of one loss term w.r.t. float32 embeddings, with forward and backward run under
    ``torch.autocast("cpu", dtype=autocast)`` (none: without autocast); ``rank`` None: one process."""
    data = _data()
    start, end = shard_range(C, rank or 0, WORLD if rank is not None else 1)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL) if rank is not None else slice(None)
    embeddings = data["teacher"].flip(0)[rows].clone().requires_grad_()
    head = FrozenPartialFC(C, data["centres"][start:end], SCALE, m2=0.3, sample_rate=rate, dtype=torch.float32, chunk=2)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        terms = head(embeddings, data["labels"][rows], data["margins"][rows], data["teacher"][rows], TEMPERATURE)
        terms[term].backward()
    assert embeddings.grad is not None
    return embeddings.grad


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return gloo_world(_rank_results, WORLD, tmp_path_factory.mktemp("partial_fc"))


def test_two_processes_equal_one_with_the_angle_term(world: list[dict]) -> None:
    loss, grads = _reference_md()
    for rank in range(WORLD):
        assert world[rank]["md_loss"] == pytest.approx(loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(torch.tensor(world[rank]["md_grads"][name]), grad, **TOL)


def test_sampling_keeps_every_positive_and_the_loss_is_that_of_the_sampled_set(world: list[dict]) -> None:
    data = _data()
    columns = sorted(world[0]["sampled_columns"] + world[1]["sampled_columns"])
    assert set(data["labels"].tolist()) <= set(columns)
    for rank in range(WORLD):
        start, end = shard_range(C, rank, WORLD)
        positives = {label for label in data["labels"].tolist() if start <= label < end}
        assert len(world[rank]["sampled_columns"]) == max(int(RATE * (end - start)), len(positives))
    assert len(columns) < C, "some negatives must have been left out"
    # By hand, over the sampled classes only: margin cross-entropy and the soft-logit KL.
    index = torch.tensor(columns)
    position = {int(c): i for i, c in enumerate(columns)}
    target = torch.tensor([position[int(label)] for label in data["labels"]])
    x = F.normalize(data["teacher"].flip(0), dim=1)
    t = F.normalize(data["teacher"], dim=1)
    cos = x @ data["centres"][index].T
    theta = torch.acos(cos.gather(1, target[:, None]).squeeze(1).clamp(-1 + 1e-6, 1 - 1e-6))
    logits = cos.scatter(1, target[:, None], torch.cos(theta + data["margins"])[:, None]) * SCALE
    margin_loss = F.cross_entropy(logits, target)
    student = F.log_softmax(SCALE * cos / TEMPERATURE, dim=1)
    teacher = F.log_softmax(SCALE * (t @ data["centres"][index].T) / TEMPERATURE, dim=1)
    kd = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * TEMPERATURE**2
    for rank in range(WORLD):
        assert world[rank]["sampled_margin"] == pytest.approx(float(margin_loss), rel=1e-5)
        assert world[rank]["sampled_kd"] == pytest.approx(float(kd), rel=1e-5)


def test_one_process_equals_margin_head_and_centre_kd_in_loss_and_gradient() -> None:
    data = _data()
    embeddings = data["teacher"].flip(0).clone().requires_grad_()
    head = FrozenPartialFC(C, data["centres"], SCALE, m2=0.3, dtype=torch.float32, chunk=3)
    terms = head(embeddings, data["labels"], data["margins"], data["teacher"], TEMPERATURE)
    (terms["margin"] + 0.7 * terms["kd"]).backward()
    ours = embeddings.grad.clone()
    embeddings.grad = None
    reference = MarginHead(C, D, SCALE, 1.0, 0.3, 0.0, learnable=False, centres=data["centres"])
    ce = F.cross_entropy(reference.logits(embeddings, data["labels"], data["margins"]), data["labels"])
    kd = reference(embeddings, data["labels"], teacher=data["teacher"], temperature=TEMPERATURE)["kd"]
    (ce + 0.7 * kd).backward()
    torch.testing.assert_close(terms["margin"], ce.detach(), **TOL)
    torch.testing.assert_close(terms["kd"], kd.detach(), **TOL)
    torch.testing.assert_close(ours, embeddings.grad, **TOL)


def test_frozen_centres_have_no_gradient_and_no_optimiser_state() -> None:
    data = _data()
    head = FrozenPartialFC(C, data["centres"], SCALE)
    assert list(head.parameters()) == []
    assert head.weight.dtype == torch.float16 and not head.weight.requires_grad
    assert head.held_bytes() == C * D * 2


def test_half_precision_centres_move_the_loss_by_little() -> None:
    data = _data()
    embeddings = data["teacher"].flip(0)
    full = FrozenPartialFC(C, data["centres"], 64.0, m2=0.3, dtype=torch.float32)
    half = FrozenPartialFC(C, data["centres"], 64.0, m2=0.3, dtype=torch.float16)
    exact = full(embeddings, data["labels"], data["margins"])["margin"]
    rounded = half(embeddings, data["labels"], data["margins"])["margin"]
    assert abs(float(rounded - exact)) < 2e-2 * max(1.0, abs(float(exact)))


@pytest.mark.parametrize("rate", [1.0, RATE])
@pytest.mark.parametrize("term", ["margin", "kd"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_gradients_do_not_depend_on_the_callers_autocast(term: str, rate: float, dtype: torch.dtype) -> None:
    """The head computes in float32 on purpose (logits at s = 64 overflow float16); a backward run under the
    caller's autocast must not drop its matrix products to half precision."""
    exact = _term_gradient(None, term, rate, None)
    torch.testing.assert_close(_term_gradient(None, term, rate, dtype), exact, rtol=1e-6, atol=1e-9)


def test_two_processes_gradients_do_not_depend_on_the_callers_autocast(world: list[dict]) -> None:
    for rank in range(WORLD):
        grads = world[rank]["autocast_grads"]
        for key, grad in grads.items():
            term, rate, dtype = key.split("/")
            if dtype != "None":
                exact = torch.tensor(grads[f"{term}/{rate}/None"])
                torch.testing.assert_close(
                    torch.tensor(grad),
                    exact,
                    rtol=1e-6,
                    atol=1e-9,
                    msg=lambda text, r=rank, k=key: f"rank {r}, {k}: {text}",
                )
