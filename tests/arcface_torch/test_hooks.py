"""The hooks of the patched train_v2.py: the framework's own head when no facedistill loss is set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.arcface_torch.helpers import copy_upstream, run
from tests.multiprocess import file_rendezvous

# Runs in a fresh interpreter (it initialises a process group and shims Tensor.cuda for the unpatched module):
# the unpatched upstream PartialFC_V2 + CombinedMarginLoss, on CPU through a .cuda() that returns the tensor
# itself, against the head the patched train_v2.py gets from hooks.build_head with config.loss unset.
SCRIPT = r"""
import importlib.util, json, sys
import torch
import torch.distributed as dist
from easydict import EasyDict as edict

upstream, patched, rendezvous = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)

def load(root, name):
    spec = importlib.util.spec_from_file_location(f"{name}_{abs(hash(root))}", f"{root}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

from facedistill.arcface_torch import hooks
results = {}
for label, root in (("framework", upstream), ("patched", patched)):
    losses, pfc = load(root, "losses"), load(root, "partial_fc_v2")
    for sample_rate, margins in ((1.0, (1.0, 0.5, 0.0)), (0.5, (1.0, 0.0, 0.4))):
        torch.manual_seed(0)
        margin_loss = losses.CombinedMarginLoss(64, *margins, 0)
        if label == "framework":
            original = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *args, **kwargs: self
            head = pfc.PartialFC_V2(margin_loss, 32, 50, sample_rate, False)
        else:
            # Synthetic data: build_head has no training set to check the class count against.
            cfg = edict(embedding_size=32, num_classes=50, sample_rate=sample_rate, rec="synthetic")
            head = hooks.build_head(cfg, margin_loss, pfc.PartialFC_V2)
        torch.manual_seed(1)
        embeddings = torch.randn(16, 32, requires_grad=True)
        labels = torch.randint(0, 50, (16,))
        loss = head(embeddings, labels.clone())
        loss.backward()
        if label == "framework":
            torch.Tensor.cuda = original
        results[f"{label}/{sample_rate}"] = {
            "type": type(head).__name__,
            "loss": loss.item(),
            "grad": embeddings.grad.flatten().tolist(),
            "weight_grad": head.weight.grad.flatten().tolist(),
        }
print(json.dumps(results))
"""


def test_without_config_loss_the_patched_head_is_the_frameworks_own(upstream: Path, tmp_path: Path) -> None:
    patched = copy_upstream(tmp_path / "arcface_torch")
    run([sys.executable, "-m", "facedistill.cli", "arcface-torch", "patch", str(patched)], cwd=tmp_path)
    script = tmp_path / "compare.py"
    script.write_text(SCRIPT)
    result = run([sys.executable, str(script), str(upstream), str(patched), file_rendezvous(tmp_path)], cwd=tmp_path)
    values = json.loads(result.stdout.strip().splitlines()[-1])
    for rate in ("1.0", "0.5"):
        framework, patched_run = values[f"framework/{rate}"], values[f"patched/{rate}"]
        assert patched_run["type"] == framework["type"] == "PartialFC_V2"
        assert patched_run["loss"] == framework["loss"]
        assert patched_run["grad"] == framework["grad"]
        assert patched_run["weight_grad"] == framework["weight_grad"]
    assert values["framework/1.0"]["loss"] != values["framework/0.5"]["loss"]


def test_devices_follow_the_machine() -> None:
    import torch

    from facedistill.arcface_torch import hooks

    if torch.cuda.is_available():
        assert hooks.backend() == "nccl" and hooks.device_ids(1) == [1]
    else:
        assert hooks.backend() == "gloo"
        assert hooks.device(3) == torch.device("cpu") and hooks.device_ids(3) is None
