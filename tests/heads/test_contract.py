"""One head contract: ``head(embeddings, labels, margin, teacher, temperature)`` returns the loss terms by name.

Every margin head (``MarginHead``, ``ShardedMarginHead``, ``FrozenPartialFC``) returns ``{"margin": ...}`` (and
``"kd"`` when it distils over teacher centres) and answers ``true_class_cosine`` and ``distributed``, so no method
branches on which head it holds. On one process the three agree.
"""

from __future__ import annotations

import pytest
import torch

from facedistill.heads import MarginHead
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import ShardedMarginHead

C, D, B = 7, 16, 5


def _heads(centres: torch.Tensor) -> dict[str, torch.nn.Module]:
    return {
        "MarginHead": MarginHead(C, D, 32.0, 1.0, 0.3, 0.0, learnable=False, centres=centres),
        "ShardedMarginHead": ShardedMarginHead(C, D, 32.0, 1.0, 0.3, 0.0, learnable=False, centres=centres),
        "FrozenPartialFC": FrozenPartialFC(C, centres, 32.0, 1.0, 0.3, 0.0, dtype=torch.float32),
    }


def test_every_head_returns_the_same_named_terms_on_one_process() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(C, D, generator=generator)
    embeddings = torch.randn(B, D, generator=generator)
    labels = torch.randint(0, C, (B,), generator=generator)
    margin = torch.rand(B, generator=generator) * 0.4 + 0.1
    teacher = torch.randn(B, D, generator=generator)
    heads = _heads(centres)
    terms = {name: head(embeddings, labels, margin) for name, head in heads.items()}
    for name, term in terms.items():
        assert set(term) == {"margin"} and term["margin"].ndim == 0, name
        torch.testing.assert_close(term["margin"], terms["MarginHead"]["margin"], rtol=1e-5, atol=1e-5)
        assert not heads[name].distributed
        torch.testing.assert_close(
            heads[name].true_class_cosine(teacher, labels), heads["MarginHead"].true_class_cosine(teacher, labels)
        )
    distilling = ("MarginHead", "FrozenPartialFC")
    with_kd = {name: heads[name](embeddings, labels, margin, teacher, 4.0) for name in distilling}
    assert set(with_kd["MarginHead"]) == set(with_kd["FrozenPartialFC"]) == {"margin", "kd"}
    torch.testing.assert_close(with_kd["FrozenPartialFC"]["kd"], with_kd["MarginHead"]["kd"], rtol=1e-4, atol=1e-5)
    assert with_kd["MarginHead"]["kd"] > 0


def test_a_head_that_learns_its_centres_refuses_a_teacher() -> None:
    head = ShardedMarginHead(C, D)
    with pytest.raises(ValueError, match="learns its own centres"):
        head(torch.randn(B, D), torch.zeros(B, dtype=torch.long), teacher=torch.randn(B, D))
