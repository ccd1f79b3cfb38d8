"""ShardedMarginHead against MarginHead + F.cross_entropy on the concatenated batch.

The two-rank checks run in one spawned gloo world (starting processes costs seconds on a small machine); each
rank records a traceback per case, and the tests below report the cases separately.
"""

from __future__ import annotations

import datetime
import json
import traceback
from collections.abc import Callable, Iterator
from itertools import product
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facedistill.heads import MarginHead
from facedistill.heads.sharded import (
    ShardedMarginHead,
    clip_grad_norm_sharded_,
    gather_shards,
    shard_optimizer_state,
    shard_range,
    shard_tensor,
    unshard_optimizer_state,
)
from tests.multiprocess import spawn_world

WORLD = 2
C, D, B_LOCAL, IN = 7, 4, 3, 5  # 7 classes over 2 ranks: [0, 4) and [4, 7)
# Rank 0's images all belong to rank 1's classes, rank 1's to both; class 5 appears on both ranks.
LABELS = torch.tensor([5, 6, 4, 0, 5, 3])
MARGINS = {"m1": 1.05, "m2": 0.3, "m3": 0.1, "scale": 16.0}
TOL = {"atol": 1e-5, "rtol": 1e-5}
JOIN_TIMEOUT_S = 180.0  # generous: two fresh interpreters importing torch on a loaded 2-core machine
COLLECTIVE_TIMEOUT_S = 30  # a desynchronised collective fails within this instead of hanging


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embeddings": torch.randn(WORLD * B_LOCAL, D, generator=generator),
        "centres": torch.randn(C, D, generator=generator),
        "margins": 0.2 + 0.3 * torch.rand(WORLD * B_LOCAL, generator=generator),
        "teacher": torch.randn(WORLD * B_LOCAL, D, generator=generator),
        "inputs": torch.randn(WORLD * B_LOCAL, IN, generator=generator),
    }


def _reference(
    data: dict[str, torch.Tensor], learnable: bool, with_margin: bool
) -> tuple[torch.Tensor, torch.Tensor, MarginHead]:
    head = MarginHead(C, D, learnable=learnable, centres=data["centres"], **MARGINS)
    embeddings = data["embeddings"].clone().requires_grad_()
    margin = data["margins"] if with_margin else None
    loss = F.cross_entropy(head.logits(embeddings, LABELS, margin), LABELS)
    loss.backward()
    return loss.detach(), embeddings.grad, head


# --------------------------------------------------------------------------------------------------------------------
# The two-rank world: cases run in order on both ranks, collectives first, assertions last.


def _local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * B_LOCAL : (rank + 1) * B_LOCAL].clone()


def _case_equivalence(rank: int, learnable: bool, with_margin: bool) -> None:
    data = _data()
    ref_loss, ref_grad, ref_head = _reference(data, learnable, with_margin)
    head = ShardedMarginHead(C, D, learnable=learnable, centres=data["centres"], **MARGINS)
    embeddings = _local(data["embeddings"], rank).requires_grad_()
    margin = _local(data["margins"], rank) if with_margin else None
    loss = head(embeddings, _local(LABELS, rank), margin)["margin"]
    loss.backward()
    start, end = shard_range(C, rank, WORLD)
    full_weight_grad = gather_shards(head.weight.grad, C, dst=None) if learnable else None
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
    torch.testing.assert_close(embeddings.grad, _local(ref_grad, rank), **TOL)
    if learnable:
        torch.testing.assert_close(head.weight.grad, ref_head.weight.grad[start:end], **TOL)
        torch.testing.assert_close(full_weight_grad, ref_head.weight.grad, **TOL)
    else:
        assert head.weight.grad is None and not head.weight.requires_grad


def _case_ddp_backbone(rank: int) -> None:
    """A DDP backbone with ``undo_ddp_average`` gets the single-process gradient; clipping and an SGD step too."""
    data = _data(1)
    torch.manual_seed(0)
    reference_model = nn.Linear(IN, D)
    model = nn.Linear(IN, D)
    model.load_state_dict(reference_model.state_dict())
    reference_head = MarginHead(C, D, centres=data["centres"], **MARGINS)
    reference_loss = F.cross_entropy(reference_head.logits(reference_model(data["inputs"]), LABELS), LABELS)
    reference_loss.backward()
    reference_params = [*reference_model.parameters(), reference_head.weight]
    reference_norm = nn.utils.clip_grad_norm_(reference_params, 0.05)
    torch.optim.SGD(reference_params, lr=0.5, momentum=0.9, weight_decay=5e-4).step()

    ddp = DistributedDataParallel(model)
    head = ShardedMarginHead(C, D, centres=data["centres"], undo_ddp_average=True, **MARGINS)
    loss = head(ddp(_local(data["inputs"], rank)), _local(LABELS, rank))["margin"]
    loss.backward()
    norm = clip_grad_norm_sharded_(model.parameters(), head.parameters(), 0.05)
    torch.optim.SGD([*model.parameters(), head.weight], lr=0.5, momentum=0.9, weight_decay=5e-4).step()
    full = head.full_state(dst=None)

    start, end = shard_range(C, rank, WORLD)
    torch.testing.assert_close(loss.detach(), reference_loss.detach(), **TOL)
    torch.testing.assert_close(norm, reference_norm, **TOL)
    for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), **TOL)
    torch.testing.assert_close(head.weight.detach(), reference_head.weight.detach()[start:end], **TOL)
    torch.testing.assert_close(full, reference_head.weight.detach(), **TOL)


def _sgd(params: list[torch.Tensor]) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)


def _case_resume_across_world_sizes(rank: int, solo: object) -> None:
    """One SGD step at one world size, a world-size-free checkpoint, the next step at the other: the centres and
    momentum equal two single-process steps."""
    first, second = _data(2), _data(3)
    reference = MarginHead(C, D, centres=first["centres"], **MARGINS)
    reference_optimizer = _sgd([reference.weight])
    for batch in (first, second):
        reference_optimizer.zero_grad()
        F.cross_entropy(reference.logits(batch["embeddings"], LABELS), LABELS).backward()
        reference_optimizer.step()
    expected = reference.weight.detach()
    expected_momentum = reference_optimizer.state[reference.weight]["momentum_buffer"]

    def step(head: ShardedMarginHead, optimizer: torch.optim.Optimizer, batch: dict, world: int, r: int) -> None:
        optimizer.zero_grad()
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL) if world > 1 else slice(None)
        head(batch["embeddings"][rows], LABELS[rows])["margin"].backward()
        optimizer.step()

    def checkpoint(head: ShardedMarginHead, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, dict]:
        state = unshard_optimizer_state(optimizer.state_dict(), optimizer, head.weight, C, head.group, dst=None)
        return head.full_state(dst=None), state

    def resume(head: ShardedMarginHead, saved: tuple[torch.Tensor, dict], world: int, r: int) -> torch.optim.SGD:
        head.load_full_state(saved[0])
        optimizer = _sgd([head.weight])
        optimizer.load_state_dict(shard_optimizer_state(saved[1], optimizer, head.weight, C, r, world))
        return optimizer

    # 2 ranks -> 1 process (a one-rank group per rank stands in for a single-process run).
    sharded = ShardedMarginHead(C, D, centres=first["centres"], **MARGINS)
    optimizer = _sgd([sharded.weight])
    step(sharded, optimizer, first, WORLD, rank)
    saved = checkpoint(sharded, optimizer)
    single = ShardedMarginHead(C, D, group=solo, **MARGINS)
    single_optimizer = resume(single, saved, 1, 0)
    step(single, single_optimizer, second, 1, 0)
    after_two_to_one = single.weight.detach().clone()
    momentum_two_to_one = single_optimizer.state[single.weight]["momentum_buffer"].clone()

    # 1 process -> 2 ranks.
    single = ShardedMarginHead(C, D, centres=first["centres"], group=solo, **MARGINS)
    single_optimizer = _sgd([single.weight])
    step(single, single_optimizer, first, 1, 0)
    saved = checkpoint(single, single_optimizer)
    sharded = ShardedMarginHead(C, D, **MARGINS)
    optimizer = resume(sharded, saved, WORLD, rank)
    step(sharded, optimizer, second, WORLD, rank)
    final_state = unshard_optimizer_state(optimizer.state_dict(), optimizer, sharded.weight, C, dst=0)

    start, end = shard_range(C, rank, WORLD)
    torch.testing.assert_close(after_two_to_one, expected, **TOL)
    torch.testing.assert_close(momentum_two_to_one, expected_momentum, **TOL)
    torch.testing.assert_close(sharded.weight.detach(), expected[start:end], **TOL)
    torch.testing.assert_close(optimizer.state[sharded.weight]["momentum_buffer"], expected_momentum[start:end], **TOL)
    if rank == 0:
        torch.testing.assert_close(final_state["state"][0]["momentum_buffer"], expected_momentum, **TOL)
    else:
        assert final_state is None


def _case_full_state(rank: int) -> None:
    data = _data()
    frozen = ShardedMarginHead(C, D, learnable=False, centres=data["centres"], **MARGINS)
    learnable = ShardedMarginHead(C, D, centres=data["centres"], **MARGINS)
    on_rank_zero = frozen.full_state()
    everywhere = learnable.full_state(dst=None)
    start, end = shard_range(C, rank, WORLD)
    local = ShardedMarginHead(C, D, local_centres=data["centres"][start:end], **MARGINS)
    local.load_full_state(everywhere * 2)

    if rank == 0:
        torch.testing.assert_close(on_rank_zero, F.normalize(data["centres"], dim=1), atol=0, rtol=0)
    else:
        assert on_rank_zero is None
    torch.testing.assert_close(everywhere, data["centres"], atol=0, rtol=0)
    torch.testing.assert_close(local.weight.detach(), 2 * data["centres"][start:end], atol=0, rtol=0)
    assert frozen.held_bytes() == (end - start) * D * 4
    assert (end - start) == (4 if rank == 0 else 3)


def _case_true_class_cosine(rank: int) -> None:
    data = _data()
    head = ShardedMarginHead(C, D, learnable=False, centres=data["centres"], **MARGINS)
    cosine = head.true_class_cosine(_local(data["teacher"], rank), _local(LABELS, rank))
    centres = F.normalize(data["centres"], dim=1)
    expected = (F.normalize(data["teacher"], dim=1) * centres[LABELS]).sum(dim=1)
    torch.testing.assert_close(cosine, _local(expected, rank), **TOL)


def _case_label_out_of_range(rank: int) -> None:
    data = _data()
    head = ShardedMarginHead(C, D, centres=data["centres"], **MARGINS)
    labels = _local(LABELS, rank)
    labels[0] = C  # no rank holds class C: both ranks must raise, after the same collectives
    with pytest.raises(ValueError, match="outside"):
        head(_local(data["embeddings"], rank), labels)


def _cpu_autocast_lowers_to(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


# The lower precisions CPU autocast supports in this torch (float16 only in recent ones).
AUTOCAST_DTYPES = tuple(dtype for dtype in (torch.bfloat16, torch.float16) if _cpu_autocast_lowers_to(dtype))


def _gradients_under(autocast: torch.dtype | None, learnable: bool, rank: int | None) -> list[torch.Tensor]:
    """The embedding (and, when learnable, centre) gradients of the margin loss of float32 inputs, with forward
    and backward under ``torch.autocast("cpu", dtype=autocast)`` (None: without); ``rank`` None: one process."""
    data = _data()
    head = ShardedMarginHead(C, D, learnable=learnable, centres=data["centres"], **MARGINS)
    local = (lambda t: _local(t, rank)) if rank is not None else (lambda t: t.clone())
    embeddings = local(data["embeddings"]).requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        head(embeddings, local(LABELS), local(data["margins"]))["margin"].backward()
    return [embeddings.grad, *([head.weight.grad] if learnable else [])]


def _case_autocast(rank: int) -> None:
    """The head computes in float32 on purpose: a backward under the caller's autocast must not lower it."""
    for learnable in (True, False):
        exact = _gradients_under(None, learnable, rank)
        for dtype in AUTOCAST_DTYPES:
            for mine, theirs in zip(_gradients_under(dtype, learnable, rank), exact, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-9, msg=lambda text, d=dtype: f"{d}: {text}")


EQUIVALENCE_CASES = [f"equivalence-learnable={a}-margin={b}" for a, b in product([True, False], [False, True])]


def _cases(solo: object) -> dict[str, Callable[[int], None]]:
    cases: dict[str, Callable[[int], None]] = {}
    for (learnable, with_margin), name in zip(product([True, False], [False, True]), EQUIVALENCE_CASES, strict=True):
        cases[name] = lambda rank, a=learnable, b=with_margin: _case_equivalence(rank, a, b)
    cases["ddp-backbone"] = _case_ddp_backbone
    cases["resume-across-world-sizes"] = lambda rank: _case_resume_across_world_sizes(rank, solo)
    cases["full-state"] = _case_full_state
    cases["true-class-cosine"] = _case_true_class_cosine
    cases["label-out-of-range"] = _case_label_out_of_range
    cases["autocast"] = _case_autocast
    return cases


def _worker(rank: int, ports: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results: dict[str, str] = {}
    try:
        # new_group is collective: every rank creates every one-rank group, then keeps its own.
        solo = [dist.new_group([r]) for r in range(WORLD)][rank]
        for name, case in _cases(solo).items():
            try:
                case(rank)
                results[name] = ""
            except (AssertionError, pytest.fail.Exception):
                results[name] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[int, str]]]:
    out_dir = tmp_path_factory.mktemp("sharded")
    spawn_world(_worker, (str(out_dir),), WORLD, out_dir, JOIN_TIMEOUT_S)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    yield {name: {r: per_rank[r].get(name, "not run") for r in range(WORLD)} for name in per_rank[0]}


def _assert_case(results: dict[str, dict[int, str]], name: str) -> None:
    failures = {rank: error for rank, error in results[name].items() if error}
    assert not failures, "\n".join(f"rank {rank}:\n{error}" for rank, error in failures.items())


@pytest.mark.parametrize("name", EQUIVALENCE_CASES)
def test_two_ranks_match_single_process_loss_and_gradients(two_ranks: dict, name: str) -> None:
    _assert_case(two_ranks, name)


@pytest.mark.parametrize(
    "name",
    ["ddp-backbone", "resume-across-world-sizes", "full-state", "true-class-cosine", "label-out-of-range", "autocast"],
)
def test_two_ranks(two_ranks: dict, name: str) -> None:
    _assert_case(two_ranks, name)


# --------------------------------------------------------------------------------------------------------------------
# One process, no process group.


@pytest.mark.parametrize(("num_classes", "world"), [(c, w) for c in range(1, 12) for w in range(1, 5) if c >= w])
def test_shard_range_is_partial_fc_split(num_classes: int, world: int) -> None:
    ranges = [shard_range(num_classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
    assert sum(end - start for start, end in ranges) == num_classes
    for r, (start, end) in enumerate(ranges):
        # arcface_torch PartialFC_V2: num_local and class_start.
        assert end - start == num_classes // world + int(r < num_classes % world)
        assert start == num_classes // world * r + min(r, num_classes % world)


@pytest.mark.parametrize(("learnable", "with_margin"), list(product([True, False], [False, True])))
def test_world_size_one_is_exactly_margin_head_and_cross_entropy(learnable: bool, with_margin: bool) -> None:
    data = _data()
    ref_loss, ref_grad, ref_head = _reference(data, learnable, with_margin)
    head = ShardedMarginHead(C, D, learnable=learnable, centres=data["centres"], **MARGINS)
    assert (head.world_size, head.class_start, head.class_end) == (1, 0, C)
    embeddings = data["embeddings"].clone().requires_grad_()
    loss = head(embeddings, LABELS, data["margins"] if with_margin else None)["margin"]
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss)
    assert torch.equal(embeddings.grad, ref_grad)
    if learnable:
        assert torch.equal(head.weight.grad, ref_head.weight.grad)
    assert torch.equal(head.weight, ref_head.weight)


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_world_size_one_gradients_do_not_depend_on_the_callers_autocast(learnable: bool, dtype: torch.dtype) -> None:
    exact = _gradients_under(None, learnable, None)
    for mine, theirs in zip(_gradients_under(dtype, learnable, None), exact, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-9)


def test_world_size_one_state_and_memory() -> None:
    centres = _data()["centres"]
    head = ShardedMarginHead(C, D, centres=centres)
    assert torch.equal(head.full_state(), centres)
    head.load_full_state(centres * 3)
    assert torch.equal(head.weight.detach(), centres * 3)
    assert head.held_bytes() == C * D * 4
    head(torch.randn(2, D), torch.tensor([0, 6]))["margin"].backward()
    assert head.held_bytes() == 2 * C * D * 4  # the shard and its gradient
    cosine = head.true_class_cosine(centres[:2], torch.tensor([1, 0]))
    assert cosine[0].item() == pytest.approx(F.cosine_similarity(centres[0], centres[1], dim=0).item(), abs=1e-6)


def test_shard_and_unshard_tensors_and_optimizer_state() -> None:
    full = torch.arange(7 * 2, dtype=torch.float32).view(7, 2)
    pieces = [shard_tensor(full, r, 3) for r in range(3)]
    assert [len(p) for p in pieces] == [3, 2, 2]
    assert torch.equal(torch.cat(pieces), full)
    assert gather_shards(full, 7) is not None and torch.equal(gather_shards(full, 7), full)

    head = ShardedMarginHead(C, D, centres=_data()["centres"])
    other = nn.Parameter(torch.zeros(3))
    optimizer = _sgd([other, head.weight])
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 6]))["margin"].backward()
    other.grad = torch.ones(3)
    optimizer.step()
    saved = unshard_optimizer_state(optimizer.state_dict(), optimizer, head.weight, C)
    assert saved is not None
    sharded = shard_optimizer_state(saved, optimizer, head.weight, C, rank=1, world_size=2)
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    assert torch.equal(sharded["state"][1]["momentum_buffer"], momentum[4:])
    assert torch.equal(sharded["state"][0]["momentum_buffer"], optimizer.state[other]["momentum_buffer"])


def test_invalid_construction_is_explained() -> None:
    centres = _data()["centres"]
    with pytest.raises(ValueError, match="frozen centres need"):
        ShardedMarginHead(C, D, learnable=False)
    with pytest.raises(ValueError, match="not both"):
        ShardedMarginHead(C, D, centres=centres, local_centres=centres)
    with pytest.raises(ValueError, match=r"must be \(7, 4\)"):
        ShardedMarginHead(C, D, local_centres=centres[:3])
    with pytest.raises(ValueError, match="margins must satisfy"):
        ShardedMarginHead(C, D, m2=-0.1)
