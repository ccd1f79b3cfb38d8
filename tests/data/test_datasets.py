import numpy as np
import pytest
import torch

from facedistill.data.datasets import ImageFolderDataset, RecordDataset, collate_faces, open_training_set
from facedistill.data.images import (
    ImageDecodeError,
    decode_image,
    normalise,
    random_horizontal_flip,
    random_shift,
)
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


def test_random_shift_moves_each_image_by_its_own_offset_and_blackens_the_border() -> None:
    # Each image is one bright pixel at (5, 5) of a 12 x 12 grid: where it lands is the offset that was drawn.
    images = torch.zeros(64, 3, 12, 12, dtype=torch.uint8)
    images[:, :, 5, 5] = 200
    shifted = random_shift(images, torch.Generator().manual_seed(0), 3)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    landed = [divmod(int(image[0].flatten().argmax()), 12) for image in shifted]
    offsets = {(row - 5, column - 5) for row, column in landed}
    assert all(-3 <= dy <= 3 and -3 <= dx <= 3 for dy, dx in offsets) and len(offsets) > 20
    assert all(int(image.sum()) == 3 * 200 for image in shifted), "a shift of 3 cannot push (5, 5) out of 12 x 12"
    # A full image loses the rows and columns it moved across: they come back black.
    full = torch.full((1, 3, 12, 12), 9, dtype=torch.uint8)
    moved = random_shift(full, torch.Generator().manual_seed(1), 3)
    assert 0 < int((moved == 0).sum()) < moved.numel() and set(moved.unique().tolist()) <= {0, 9}
    assert random_shift(full, torch.Generator(), 0) is full
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        random_shift(full, torch.Generator(), -1)


def test_random_shift_of_a_share_is_that_share_of_the_whole_batch() -> None:
    images = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = random_shift(images, torch.Generator().manual_seed(4), 2)
    share = random_shift(images[4:], torch.Generator().manual_seed(4), 2, global_batch=8, offset=4)
    assert torch.equal(share, whole[4:]) and not torch.equal(whole, images)
    with pytest.raises(ValueError, match="not inside a batch of 8"):
        random_shift(images[4:], torch.Generator(), 2, global_batch=8, offset=6)


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
