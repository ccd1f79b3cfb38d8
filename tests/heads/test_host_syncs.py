"""Host syncs of one FrozenPartialFC step, counted against upstream PartialFC_V2's step in the same harness.

On a GPU every device -> host sync (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ``unique``,
boolean-mask indexing, a blocking copy of a host tensor to the device) stalls the launch queue until the device has
caught up (docs/GPU.md). Without a GPU the harness counts the calls that would sync there, by monkeypatching them
around one forward + backward, in a spawned two-rank gloo world (so the head is sharded: every rank has rows whose
class lives on the other). Upstream's ``partial_fc_v2.py`` is loaded from ../shared with ``.cuda()`` shimmed (as
tests/arcface_torch/test_hooks.py does).

What the harness counts, per call site (nested calls inside a counted or shimmed call are not counted again):

- ``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``/``index`` of a tensor;
- ``nonzero``, ``argwhere``, ``unique``, ``unique_consecutive``, ``masked_select``, one-argument ``torch.where``;
- indexing with a boolean mask (read, or write of a tensor; writing a Python number dispatches to ``masked_fill_``,
  which does not sync);
- ``copy``: a tensor made by a host factory (``torch.rand``, ``torch.zeros``, ... without ``device``) moved with
  ``.cuda()`` or ``.to(device)`` without ``non_blocking=True``. A ``non_blocking`` copy is asynchronous on CUDA only
  from pinned memory, which a CPU-only torch cannot allocate: ``test_sampling_draws_are_pinned_and_copied_async``
  checks that part with a stand-in CUDA device.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from facedistill.heads import partial_fc
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import shard_range
from tests.arcface_torch.helpers import UPSTREAM
from tests.helpers import gloo_world

WORLD = 2
C, D, B_LOCAL = 400, 16, 8  # 200 classes per rank; a global batch of 16
# 0.5: 100 sampled classes per rank, more than the batch's positives can be (the usual case: no count needed);
# 0.04: 8 per rank, fewer than the 16 rows of the batch, so how many positives a rank holds decides the size.
RATES = (1.0, 0.5, 0.04)
CHUNK = 64  # several chunks of classes: a sync per chunk would show
# FrozenPartialFC's remaining syncs, and why (see the comments at each in heads/partial_fc.py):
# ``bool``: the label check (a label no rank holds must fail, not give a silently wrong loss);
# ``item`` (only when the batch could hold more positives than the sample): the number of classes scored.
EXPECTED = {1.0: {"bool": 1}, 0.5: {"bool": 1}, 0.04: {"bool": 1, "item": 1}}

_HOST = "_facedistill_host_made"  # marks a tensor made by a host factory in the counted step


class SyncCounter:
    """Counts, by kind, the calls that sync the host with a CUDA device, while ``counting()`` is active."""

    TENSOR_METHODS = {
        "item": "item", "tolist": "tolist", "cpu": "cpu", "numpy": "numpy", "nonzero": "nonzero",
        "argwhere": "nonzero", "unique": "unique", "unique_consecutive": "unique", "masked_select": "mask",
        "__bool__": "bool", "__int__": "int", "__float__": "float", "__index__": "int",
    }  # fmt: skip
    TORCH_FUNCTIONS = {
        "nonzero": "nonzero", "argwhere": "nonzero", "unique": "unique", "unique_consecutive": "unique",
        "masked_select": "mask",
    }  # fmt: skip
    FACTORIES = ("rand", "randn", "randint", "randperm", "normal", "zeros", "ones", "empty", "full", "tensor", "arange")
    CONVERSIONS = ("long", "int", "float", "half", "double", "bool")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False
        self.depth = 0

    def _count(self, kind: str) -> None:
        if self.active and self.depth == 0:
            self.counts[kind] += 1

    def _wrap(self, original: Callable[..., Any], kind: Callable[..., str | None]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = kind(*args, **kwargs) if self.active and self.depth == 0 else None
            if name:
                self._count(name)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapper

    @staticmethod
    def _is_mask(index: Any) -> bool:
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) and i.dim() for i in indices)

    def _read_kind(self, tensor: torch.Tensor, index: Any) -> str | None:
        return "mask" if self._is_mask(index) else None

    def _write_kind(self, tensor: torch.Tensor, index: Any, value: Any) -> str | None:
        # A Python number written through a mask goes to masked_fill_, which needs no indices (no sync).
        return "mask" if self._is_mask(index) and not isinstance(value, (bool, int, float)) else None

    @staticmethod
    def _where_kind(*args: Any, **kwargs: Any) -> str | None:
        return "nonzero" if len(args) + len(kwargs) == 1 else None  # torch.where(condition) is nonzero

    def _mark_factory(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def factory(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if self.active and kwargs.get("device") is None and isinstance(result, torch.Tensor):
                setattr(result, _HOST, True)
            return result

        return factory

    def _keep_mark(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def conversion(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            result = original(tensor, *args, **kwargs)
            if getattr(tensor, _HOST, False) and result is not tensor:
                setattr(result, _HOST, True)
            return result

        return conversion

    def _copy(self, tensor: torch.Tensor, non_blocking: bool) -> None:
        if getattr(tensor, _HOST, False) and not non_blocking:
            self._count("copy")

    def _to(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            moves = "device" in kwargs or isinstance(first, (torch.device, str, torch.Tensor))
            non_blocking = kwargs.get("non_blocking", len(args) > 1 and isinstance(args[1], bool) and args[1])
            if moves and self.depth == 0:
                self._copy(tensor, bool(non_blocking))
            result = original(tensor, *args, **kwargs)
            if getattr(tensor, _HOST, False) and not moves and result is not tensor:
                setattr(result, _HOST, True)
            return result

        return to

    def _cuda_shim(self) -> Callable[..., torch.Tensor]:
        """Upstream's ``.cuda()`` on a CPU-only machine: the tensor itself, counted as a copy when host-made."""

        def cuda(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.depth == 0:
                self._copy(tensor, bool(kwargs.get("non_blocking", False)))
            return tensor

        return cuda

    @contextmanager
    def patched(self) -> Iterator[SyncCounter]:
        """Install the counting wrappers (and the ``.cuda()`` shim); count only inside ``counting()``."""
        with pytest.MonkeyPatch.context() as patch:
            for method, kind in self.TENSOR_METHODS.items():
                always = self._wrap(getattr(torch.Tensor, method), lambda *_, k=kind, **__: k)
                patch.setattr(torch.Tensor, method, always)
            for function, kind in self.TORCH_FUNCTIONS.items():
                patch.setattr(torch, function, self._wrap(getattr(torch, function), lambda *_, k=kind, **__: k))
            patch.setattr(torch, "where", self._wrap(torch.where, self._where_kind))
            patch.setattr(torch.Tensor, "__getitem__", self._wrap(torch.Tensor.__getitem__, self._read_kind))
            patch.setattr(torch.Tensor, "__setitem__", self._wrap(torch.Tensor.__setitem__, self._write_kind))
            for name in self.FACTORIES:
                patch.setattr(torch, name, self._mark_factory(getattr(torch, name)))
            for name in self.CONVERSIONS:
                patch.setattr(torch.Tensor, name, self._keep_mark(getattr(torch.Tensor, name)))
            patch.setattr(torch.Tensor, "to", self._to(torch.Tensor.to))
            patch.setattr(torch.Tensor, "cuda", self._cuda_shim())
            yield self

    @contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        self.counts = Counter()
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


def _load_upstream(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"upstream_{name}", UPSTREAM / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(C, D, generator=generator)
    embeddings = torch.randn(WORLD * B_LOCAL, D, generator=generator)
    teacher = torch.randn(WORLD * B_LOCAL, D, generator=generator)
    labels = torch.randint(0, C, (WORLD * B_LOCAL,), generator=generator)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return centres, embeddings[rows].clone(), teacher[rows].clone(), labels[rows].clone()


def _rank_counts(rank: int) -> dict[str, dict[str, int]]:
    losses, pfc = _load_upstream("losses"), _load_upstream("partial_fc_v2")
    centres, embeddings, teacher, labels = _batch(rank)
    start, end = shard_range(C, rank, WORLD)
    counts: dict[str, dict[str, int]] = {}
    counter = SyncCounter()
    with counter.patched():
        for rate in RATES:
            ours = FrozenPartialFC(C, centres[start:end], 32.0, m2=0.3, sample_rate=rate, chunk=CHUNK)
            upstream = pfc.PartialFC_V2(losses.CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), D, C, rate, False)
            for name, step in (
                ("ours", lambda x, head=ours: sum(head(x, labels, teacher=teacher).values())),
                ("upstream", lambda x, head=upstream: head(x, labels.clone())),
            ):
                torch.manual_seed(rank)
                x = embeddings.clone().requires_grad_()
                with counter.counting() as found:
                    step(x).backward()
                assert x.grad is not None and bool(torch.isfinite(x.grad).all())
                counts[f"{name}/{rate}"] = dict(found)
    return counts


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, int]]]:
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream arcface_torch snapshot not found at {UPSTREAM} (expected in ../shared beside the repo)")
    return gloo_world(_rank_counts, WORLD, tmp_path_factory.mktemp("host_syncs"))


@pytest.mark.parametrize("rate", RATES)
def test_frozen_partial_fc_syncs_no_more_than_upstream_partial_fc_v2(counts: list[dict], rate: float) -> None:
    for rank, found in enumerate(counts):
        ours, upstream = found[f"ours/{rate}"], found[f"upstream/{rate}"]
        report = f"rank {rank}, sample_rate {rate}: FrozenPartialFC {ours}, PartialFC_V2 {upstream}"
        assert sum(ours.values()) <= sum(upstream.values()), report
        # Only the syncs whose need is explained in the code, however many chunks the classes are scored in.
        assert ours == EXPECTED[rate], report


def test_the_harness_sees_upstreams_syncs(counts: list[dict]) -> None:
    """Upstream's known syncs are counted (a harness that counted nothing would pass the test above)."""
    for found in counts:
        sampled, full = found["upstream/0.5"], found["upstream/1.0"]
        assert sampled["unique"] == 1 and sampled["item"] == 1 and sampled["nonzero"] == 2, sampled
        # torch.rand(...).cuda() when sampling, and the all-gather buffers torch.zeros(...).cuda(), two per rank.
        assert sampled["copy"] == 1 + 2 * WORLD and full["copy"] == 2 * WORLD, (sampled, full)
        assert "unique" not in full and sampled["mask"] > full["mask"] > 0, (sampled, full)


def test_sampling_draws_are_pinned_and_copied_async(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the sampling uniforms are drawn by the CPU generator (as PartialFC_V2 draws them) into pinned memory
    and copied without blocking: a pageable or blocking host -> device copy synchronises the stream."""
    drawn: list[dict[str, Any]] = []
    moved: list[tuple[tuple, dict]] = []
    rand, to = torch.rand, torch.Tensor.to

    def fake_rand(*args: Any, **kwargs: Any) -> torch.Tensor:
        drawn.append(dict(kwargs))
        kwargs.pop("pin_memory", None)  # a CPU-only torch cannot pin
        return rand(*args, **kwargs)

    def fake_to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moved.append((args, kwargs))
        return tensor if args and args[0] == torch.device("cuda") else to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "rand", fake_rand)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    torch.manual_seed(3)
    draw = partial_fc._host_uniforms(7, torch.device("cuda"))
    torch.manual_seed(3)
    assert torch.equal(draw, rand(7)), "the CPU generator's draws, as PartialFC_V2's torch.rand(...).cuda()"
    assert drawn == [{"pin_memory": True}]
    assert moved == [((torch.device("cuda"),), {"non_blocking": True})]


def test_sampling_draws_the_classes_upstream_draws() -> None:
    """Same seed, same positives: the columns PartialFC_V2.sample selects (its rule, inlined with ``.cuda()``
    dropped), in both regimes (budget above and below the number of positives). ``sample`` takes the column of
    every row of the batch, -1 where the class lives on another rank."""
    generator = torch.Generator().manual_seed(1)
    num_local = 50
    # Budget >= batch (no count); budget < batch with fewer positives (count, then draw) or more (positives only).
    for rate, batch in ((0.3, 12), (0.5, 30), (0.1, 12), (0.3, 40), (1.0, 12)):
        head = FrozenPartialFC(num_local, F.normalize(torch.randn(num_local, 4, generator=generator)), sample_rate=rate)
        for seed in range(3):
            labels = torch.randint(-1, num_local, (batch,), generator=generator)
            torch.manual_seed(seed)
            ours = head.sample(labels)
            after_ours = torch.get_rng_state()
            torch.manual_seed(seed)
            positive = torch.unique(labels[labels >= 0], sorted=True)
            if head.num_sample >= num_local:
                expected = torch.arange(num_local)
            elif head.num_sample - positive.size(0) >= 0:
                perm = torch.rand(size=[num_local])
                perm[positive] = 2.0
                expected = torch.topk(perm, k=head.num_sample)[1].sort()[0]
            else:
                expected = positive
            assert torch.equal(ours, expected), (rate, batch, seed)
            # The same draws from the global generator, so everything drawn after them is the same too.
            assert torch.equal(after_ours, torch.get_rng_state()), (rate, batch, seed)
