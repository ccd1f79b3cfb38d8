"""MobileFaceNet: shapes, size, and structure against Chen et al. 2018 (arXiv:1804.07573), Table 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facedistill.models import BACKBONES, MobileFaceNet, create_model
from facedistill.models.complexity import count_macs, count_parameters, format_count
from facedistill.models.mobilefacenet import PAPER_BOTTLENECKS, DepthWise


@pytest.mark.parametrize("embedding_size", [128, 512])
def test_output_shape(embedding_size: int) -> None:
    model = create_model("mobilefacenet", embedding_size=embedding_size)
    assert model.embedding_size == embedding_size
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, embedding_size)
    assert torch.isfinite(out).all()


# Exact figures are pinned so any change to the architecture is noticed. The paper reports 0.99M parameters
# and 221M MAdds for d=128.
@pytest.mark.parametrize(
    ("embedding_size", "params", "macs"),
    [(128, 1_003_136, 220_965_376), (512, 1_200_512, 221_161_984)],
)
def test_params_and_macs_match_the_paper(embedding_size: int, params: int, macs: int) -> None:
    model = create_model("mobilefacenet", embedding_size=embedding_size)
    n_params, n_macs = count_parameters(model), count_macs(model)
    print(
        f"mobilefacenet({embedding_size}): {n_params} params ({format_count(n_params)}), "
        f"{n_macs} MACs ({format_count(n_macs)})"
    )
    assert 1.0e6 <= n_params <= 1.2e6 + 1e3
    assert 0.22e9 <= n_macs <= 0.23e9
    assert (n_params, n_macs) == (params, macs)


def test_mbf_is_the_wider_arcface_torch_variant() -> None:
    # arcface_torch's get_mbf (scale=2) is the ~2.06M-parameter model, not the paper's.
    model = create_model("mbf")
    n_params, n_macs = count_parameters(model), count_macs(model)
    print(f"mbf(512): {n_params} params ({format_count(n_params)}), {n_macs} MACs ({format_count(n_macs)})")
    assert n_params == 2_059_520
    assert model.layers[0].layers[0].out_channels == 128


def _paper_bottlenecks() -> list[tuple[int, int, int, int]]:
    """Table 1 expanded to one (c_in, expanded width, c_out, stride) row per bottleneck."""
    rows, c_in = [], 64
    for t, c, n, s in PAPER_BOTTLENECKS:
        for i in range(n):
            rows.append((c_in, t * c_in, c, s if i == 0 else 1))
            c_in = c
    return rows


def test_structure_follows_paper_table_1() -> None:
    model = MobileFaceNet(embedding_size=128)
    stem = model.layers[0].layers[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 64, (3, 3), (2, 2))
    dw = model.layers[1].layers[0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (64, 64, 64)
    assert (dw.kernel_size, dw.stride) == ((3, 3), (1, 1))

    bottlenecks = [m for m in model.modules() if isinstance(m, DepthWise)]
    found = []
    for block in bottlenecks:
        expand, depthwise, project = (block.layers[i].layers[0] for i in range(3))
        assert depthwise.groups == depthwise.in_channels == expand.out_channels
        assert expand.kernel_size == project.kernel_size == (1, 1)
        assert len(block.layers[2].layers) == 2  # linear bottleneck: no activation after the projection
        found.append((expand.in_channels, expand.out_channels, project.out_channels, depthwise.stride[0]))
        assert block.residual == (depthwise.stride == (1, 1) and expand.in_channels == project.out_channels)
    assert found == _paper_bottlenecks()
    assert len(found) == 15

    sep = model.conv_sep.layers[0]
    assert (sep.in_channels, sep.out_channels, sep.kernel_size) == (128, 512, (1, 1))
    gdconv, _, linear, bn = model.features.layers
    gd = gdconv.layers[0]
    assert (gd.in_channels, gd.out_channels, gd.groups, gd.kernel_size) == (512, 512, 512, (7, 7))
    assert len(gdconv.layers) == 2  # linear GDConv: BN, no activation
    assert (linear.in_features, linear.out_features, linear.bias) == (512, 128, None)
    assert isinstance(bn, nn.BatchNorm1d) and bn.affine and bn.weight.requires_grad
    assert all(isinstance(m.layers[2], nn.PReLU) for m in model.modules() if type(m).__name__ == "ConvBlock")


def test_registry_defaults() -> None:
    assert "mobilefacenet" in BACKBONES
    model = BACKBONES.create("mobilefacenet")
    assert model.embedding_size == 512
    assert model.features.dropout.p == 0.0
    assert create_model("mobilefacenet", embedding_size=128, dropout=0.2).features.dropout.p == 0.2


def test_dropout_only_acts_in_training() -> None:
    model = create_model("mobilefacenet", embedding_size=128, dropout=0.5).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_channels_last_input_gives_the_same_embedding() -> None:
    model = create_model("mobilefacenet", embedding_size=128).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        reference = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    scale = reference.abs().max()
    assert torch.allclose(out, reference, atol=1e-4 * scale)
    assert torch.allclose(out_cl, reference, atol=1e-4 * scale)


def test_fix_embedding_gamma_freezes_the_bn_weight() -> None:
    model = MobileFaceNet(embedding_size=128, fix_embedding_gamma=True)
    bn = model.features.layers[3]
    assert not bn.weight.requires_grad
    assert torch.equal(bn.weight, torch.ones(128))


def test_backward_reaches_the_stem() -> None:
    model = create_model("mobilefacenet", embedding_size=128).train()
    model(torch.randn(2, 3, 112, 112)).pow(2).sum().backward()
    grad = model.layers[0].layers[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"embedding_size": 0}, {"scale": 0}, {"blocks": (1, 4, 6)}])
def test_invalid_arguments_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MobileFaceNet(**kwargs)  # type: ignore[arg-type]
