"""Upstream's own ONNX tools on a patched checkout: ``torch2onnx.py`` exports a 128-d student (facedistill's
recipes' embedding size) with a dynamic batch, upstream's ``onnx_helper.py`` accepts it, ``inference.py`` embeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.arcface_torch.helpers import copy_upstream, facedistill, run

# An untrained mbf of the shipped recipes' size, saved as train_v2.py saves model.pt (backbone.module.state_dict()).
SAVE_MODEL = (
    "import sys, torch; from backbones import get_model; torch.manual_seed(0); "
    "torch.save(get_model('mbf', dropout=0.0, fp16=False, num_features=128).state_dict(), sys.argv[1])"
)
# Upstream's checker, on the directory torch2onnx.py wrote into, as its __main__ runs it (on the CPU provider).
CHECK = (
    "import json, sys; from onnx_helper import ArcFaceORT; handler = ArcFaceORT(sys.argv[1], cpu=True); "
    "err = handler.check('cfat'); print(json.dumps({'err': err, 'feat_dim': getattr(handler, 'feat_dim', None)}))"
)


@pytest.fixture(scope="module")
def checkout(upstream: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_upstream(tmp_path_factory.mktemp("onnx") / "arcface_torch")
    run(facedistill("arcface-torch", "patch", str(root)), cwd=root)
    return root


def test_torch2onnx_exports_a_128d_student_that_onnx_helper_accepts_at_any_batch(checkout: Path) -> None:
    pytest.importorskip("insightface", reason="onnx_helper.py reads its test face from insightface.data")
    import onnxruntime

    run_dir = checkout / "work_dirs" / "student"
    run_dir.mkdir(parents=True)
    run([sys.executable, "-c", SAVE_MODEL, str(run_dir / "model.pt")], cwd=checkout)
    # Upstream's command line: a run directory in, model.onnx beside its model.pt out; the size read from the weights.
    exported = run([sys.executable, "torch2onnx.py", str(run_dir), "--network", "mbf"], cwd=checkout)
    assert "Warning" not in exported.stderr, exported.stderr[-2000:]
    onnx_file = run_dir / "model.onnx"
    assert onnx_file.is_file(), exported.stdout

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "data"
    rng = np.random.default_rng(0)
    for batch in (1, 4):
        x = rng.uniform(-1, 1, size=(batch, 3, 112, 112)).astype(np.float32)
        (out,) = session.run(None, {"data": x})
        assert out.shape == (batch, 128)

    checked = run([sys.executable, "-c", CHECK, str(run_dir)], cwd=checkout)
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    # Its time limit (15 ms a face for the cfat track) measures the machine, not the file: on a busy 2-core CI box
    # a 437 MMAC network may miss it. Every check before it passed once feat_dim is set (its batch of 32 included).
    assert result["err"] is None or result["err"].startswith("max time cost exceed"), checked.stdout[-3000:]
    assert result["feat_dim"] == 128
    assert not (run_dir / "zzzzrefined.onnx").exists()  # the batch axis was already dynamic: nothing to re-save


def test_inference_embeds_with_a_128d_student(checkout: Path, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    run([sys.executable, "-c", SAVE_MODEL, str(weights)], cwd=checkout)
    script = (
        "import numpy as np, sys, torch, inference; from facedistill.arcface_torch import tools; "
        "state = tools.load_weights(sys.argv[1]); print(tools.embedding_size(state)); "
        "inference.inference(sys.argv[1], 'mbf', None)"
    )
    result = run([sys.executable, "-c", script, str(weights)], cwd=checkout)
    assert result.stdout.splitlines()[0] == "128"
    assert "[[" in result.stdout


def test_weights_that_are_not_a_backbone_are_refused_in_one_line(checkout: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run([sys.executable, "torch2onnx.py", str(bad), "--network", "mbf"], cwd=checkout, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad} cannot be loaded as backbone weights"), errors


def test_the_embedding_size_is_read_from_the_framework_networks_weights(checkout: Path) -> None:
    script = (
        "import json; from backbones import get_model; from facedistill.arcface_torch.tools import embedding_size; "
        "print(json.dumps({name: embedding_size(get_model(name, fp16=False, num_features=96).state_dict()) "
        "for name in ('mbf', 'mbf_large', 'r18')}))"
    )
    result = run([sys.executable, "-c", script], cwd=checkout)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"mbf": 96, "mbf_large": 96, "r18": 96}


def test_an_unregistered_network_falls_back_to_its_last_1d_tensor() -> None:
    # vit (it needs timm) and any other backbone infer_backbone does not know: the closing BatchNorm1d decides.
    from facedistill.arcface_torch.tools import embedding_size

    state = {
        "patch.weight": torch.zeros(8, 3, 4, 4),
        "blocks.0.norm.weight": torch.zeros(8),
        "feature.1.weight": torch.zeros(80),
    }
    assert embedding_size(state) == 80
    with pytest.raises(ValueError, match="has no 1-D tensor"):
        embedding_size({"w": torch.zeros(2, 2)})
