"""MAC and parameter counting against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facedistill.models.complexity import count_macs, count_parameters, format_count


def test_conv2d_macs_match_hand_count() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=True)
    # 8 output channels x 112x112 outputs x (3 input channels x 3x3 kernel); the bias add is not a MAC.
    assert count_macs(conv, (3, 112, 112)) == 8 * 112 * 112 * 3 * 3 * 3


def test_strided_conv2d_macs_use_output_size() -> None:
    conv = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
    assert count_macs(conv, (3, 112, 112)) == 64 * 56 * 56 * 3 * 3 * 3


def test_depthwise_conv_macs_match_hand_count() -> None:
    conv = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1, groups=16, bias=False)
    # One input channel per output channel: 16 x 28x28 x 3x3.
    assert count_macs(conv, (16, 56, 56)) == 16 * 28 * 28 * 9


def test_grouped_conv_macs_match_hand_count() -> None:
    conv = nn.Conv2d(32, 64, kernel_size=1, groups=4, bias=False)
    assert count_macs(conv, (32, 7, 7)) == 64 * 7 * 7 * (32 // 4)


def test_gdconv_7x7_macs_match_hand_count() -> None:
    conv = nn.Conv2d(512, 512, kernel_size=7, groups=512, bias=False)
    assert count_macs(conv, (512, 7, 7)) == 512 * 49


def test_linear_macs_match_hand_count() -> None:
    assert count_macs(nn.Linear(10, 7), (10,)) == 70
    assert count_macs(nn.Linear(25088, 512, bias=False), (25088,)) == 25088 * 512


def test_norm_and_activation_layers_are_not_counted() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.PReLU(4), nn.ReLU(), nn.Flatten(), nn.Dropout()
    )
    assert count_macs(model, (3, 5, 5)) == 4 * 25 * 3


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(x))


def test_a_module_run_twice_is_counted_twice() -> None:
    assert count_macs(_Twice(), (4,)) == 2 * 16


def test_count_macs_restores_mode_and_removes_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    count_macs(model, (3, 8, 8))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    count_macs(model, (3, 8, 8))
    assert not model.training


def test_count_parameters_and_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    assert count_parameters(model) == 10 * 5 + 5 + 5 + 5
    model[1].weight.requires_grad = False
    assert count_parameters(model) == 65
    assert count_parameters(model, trainable_only=True) == 60


@pytest.mark.parametrize(
    ("n", "unit", "expected"),
    [
        (1_200_512, None, "1.20 M"),
        (228_000_000, None, "0.23 G"),
        (12_089_606_144, None, "12.09 G"),
        (65_156_160, None, "65.16 M"),
        (2_500, None, "2.50 K"),
        (512, None, "512"),
        (0, None, "0"),
        (221_161_984, "M", "221.16 M"),
        (1_003_136, "G", "0.00 G"),
    ],
)
def test_format_count(n: int, unit: str | None, expected: str) -> None:
    assert format_count(n, unit) == expected


def test_format_count_rejects_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unit"):
        format_count(10, "T")
