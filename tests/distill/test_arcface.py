"""ArcFace's two gradients: ``exact`` and ``framework`` (arcface_torch's CombinedMarginLoss, read from ../shared)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facedistill.distill import MethodContext, create_method

UPSTREAM_LOSSES = Path(__file__).resolve().parents[3] / "shared" / "upstream" / "arcface_torch" / "losses.py"
C, D, B = 9, 8, 12


def _upstream_combined_margin_loss(scale: float, margin: float) -> torch.nn.Module:
    if not UPSTREAM_LOSSES.is_file():
        pytest.skip(f"upstream arcface_torch not found at {UPSTREAM_LOSSES.parent} (../shared beside the repo)")
    spec = importlib.util.spec_from_file_location("upstream_losses", UPSTREAM_LOSSES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CombinedMarginLoss(scale, 1.0, margin, 0.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(C, D, generator=generator)
    labels = torch.randint(0, C, (B,), generator=generator)
    embeddings = torch.randn(B, D, generator=generator)
    embeddings[0] = -weight[labels[0]]  # theta near pi: theta + m > pi, where the two "exact" forms differ
    return embeddings, labels, weight


def _ours(gradient: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeddings, labels, weight = _batch()
    method = create_method({"name": "arcface", "scale": 64.0, "margin": 0.5, "gradient": gradient}, MethodContext(C, D))
    with torch.no_grad():
        method.head.weight.copy_(weight)
    embeddings.requires_grad_(True)
    loss = method(embeddings, labels, None)["arcface"]
    loss.backward()
    return loss.detach(), embeddings.grad, method.head.weight.grad


def test_the_framework_gradient_equals_arcface_torchs_combined_margin_loss() -> None:
    margin_loss = _upstream_combined_margin_loss(64.0, 0.5)
    embeddings, labels, weight = _batch()
    embeddings.requires_grad_(True)
    weight.requires_grad_(True)
    # PartialFC_V2's forward: normalised linear, clamp, CombinedMarginLoss, cross-entropy (DistCrossEntropy on 1 rank).
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    upstream = F.cross_entropy(margin_loss(logits, labels[:, None].clone()), labels)
    upstream.backward()
    loss, grad, weight_grad = _ours("framework")
    torch.testing.assert_close(loss, upstream.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, embeddings.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight_grad, weight.grad, atol=1e-5, rtol=1e-5)


def test_the_exact_gradient_is_another_baseline() -> None:
    exact_loss, exact_grad, _ = _ours("exact")
    framework_loss, framework_grad, _ = _ours("framework")
    # Past pi (row 0) the exact form keeps the logit falling: a larger loss; the gradients differ everywhere.
    assert exact_loss > framework_loss
    assert (exact_grad[1:] - framework_grad[1:]).norm() > 1e-2


def test_an_unknown_gradient_names_the_key() -> None:
    from facedistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"method.gradient: 'mxnet' is not one of 'exact', 'framework'"):
        create_method({"name": "arcface", "gradient": "mxnet"}, MethodContext(C, D))
