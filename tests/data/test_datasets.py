import numpy as np
import pytest
import torch

from facedistill.data.datasets import ImageFolderDataset, RecordDataset, collate_faces, open_training_set
from facedistill.data.images import ImageDecodeError, decode_image, normalise, random_horizontal_flip
from facedistill.data.recordio import pack_folder_to_recordio
from facedistill.data.synthetic import write_identity_folders


@pytest.fixture()
def folder(tmp_path):
    return write_identity_folders(tmp_path / "faces", 3, 4)


def test_folder_dataset_yields_uint8_rgb_label_and_index(folder) -> None:
    dataset = ImageFolderDataset(folder)
    assert len(dataset) == 12 and dataset.num_classes == 3
    image, label, index = dataset[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112)
    assert (label, index) == (1, 5)


def test_recordio_dataset_reads_the_same_samples_as_the_folder(folder, tmp_path) -> None:
    dataset = ImageFolderDataset(folder)
    samples = [(folder / rel, int(label)) for rel, label in zip(dataset.relative_paths, dataset.labels, strict=True)]
    pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    records = open_training_set(tmp_path / "rec")
    assert isinstance(records, RecordDataset)
    assert np.array_equal(records.labels, dataset.labels)
    for index in (0, 7, 11):
        assert torch.equal(records[index][0], dataset[index][0])
    assert records.fingerprint() != dataset.fingerprint()


def test_corrupt_image_error_names_the_file_and_skip_counts_it(folder) -> None:
    broken = folder / "id_00001" / "002.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match="id_00001/002.jpg"):
        ImageFolderDataset(folder)[6]
    tolerant = ImageFolderDataset(folder, skip_bad=True)
    batch = collate_faces([tolerant[i] for i in range(4, 8)])
    assert batch.skipped == 1 and len(batch.labels) == 3


def test_wrong_size_and_empty_data_are_explained() -> None:
    import cv2

    ok, png = cv2.imencode(".png", np.zeros((100, 90, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="is 90x100, expected aligned 112x112.*facedistill align"):
        decode_image(png.tobytes(), "x.png")
    with pytest.raises(ImageDecodeError, match="empty image data"):
        decode_image(b"", "y.jpg")


def test_normalise_and_flip() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2).expand(8, 3, 1, 2).contiguous()
    assert normalise(images)[0, 0, 0].tolist() == [-1.0, 1.0]
    flipped, mask = random_horizontal_flip(images, torch.Generator().manual_seed(3))
    assert mask.any() and not mask.all()
    assert flipped[mask][:, 0, 0].tolist() == [[255, 0]] * int(mask.sum())
    assert flipped[~mask][:, 0, 0].tolist() == [[0, 255]] * int((~mask).sum())


def test_corrupt_record_names_the_record_and_skip_counts_it(folder, tmp_path) -> None:
    dataset = ImageFolderDataset(folder)
    samples = [(folder / rel, int(label)) for rel, label in zip(dataset.relative_paths, dataset.labels, strict=True)]
    rec = pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    blob = bytearray(rec.read_bytes())
    jpeg_start = blob.find(b"\xff\xd8\xff", blob.find(b"\xff\xd8\xff") + 1)  # the second image's JPEG
    blob[jpeg_start : jpeg_start + 64] = b"\0" * 64
    rec.write_bytes(bytes(blob))
    with pytest.raises(ImageDecodeError, match="train.rec image #1"):
        RecordDataset(rec)[1]
    tolerant = RecordDataset(rec, skip_bad=True)
    batch = collate_faces([tolerant[i] for i in range(4)])
    assert batch.skipped == 1 and len(batch.labels) == 3
