"""Every file in ../shared/data/odd_images decodes to RGB at its displayed size, or fails
with an ImageError whose kind says why."""

import csv

import numpy as np
import pytest

from maskrcnn import images
from tests.helpers import UNUSABLE, large_jpeg


def _index(shared_data):
    with open(shared_data / "odd_images" / "INDEX.tsv") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def test_every_odd_image_decodes_or_names_its_problem(shared_data):
    entries = _index(shared_data)
    assert len(entries) == 44
    for entry in entries:
        name = entry["filename"]
        data = (shared_data / "odd_images" / name).read_bytes()
        if name in UNUSABLE:
            with pytest.raises(images.ImageError) as err:
                images.decode(data)
            assert err.value.kind == UNUSABLE[name], name
            continue
        rgb = images.decode(data)
        width, height = (int(v) for v in entry["exif_transpose+convert(RGB)"].split()[1].split("x"))
        assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8, name


def test_exif_orientation_is_applied_only_when_asked(shared_data):
    data = (shared_data / "odd_images" / "orientation_rectangle.jpg").read_bytes()
    assert images.decode(data).shape[:2] == (2, 1)
    assert images.decode(data, exif=False).shape[:2] == (1, 2)


def test_sixteen_bit_images_are_scaled_not_clipped(shared_data):
    rgb = images.decode((shared_data / "odd_images" / "16bit.cropped.tif").read_bytes())
    assert 0 < rgb.mean() < 255 and len(np.unique(rgb)) > 16


def test_empty_and_oversized_inputs(shared_data):
    with pytest.raises(images.ImageError) as err:
        images.decode(b"")
    assert err.value.kind == "empty"
    with pytest.raises(images.ImageError) as err:
        images.decode((shared_data / "photos" / "dog1.jpg").read_bytes(), max_pixels=1000)
    assert err.value.kind == "too_large" and "--max-pixels 1000" in str(err.value)


@pytest.mark.parametrize(
    "stored, orientation, fit, reduced, full",
    [
        ((4032, 3024), 1, (800, 1333), (1512, 2016), (3024, 4032)),  # 1/2: still >= 800x1067
        ((4032, 3024), 6, (800, 1333), (2016, 1512), (4032, 3024)),  # rotated on display
        ((4032, 3024), 8, (320, 512), (504, 378), (4032, 3024)),  # 1/8 for a small model
        ((1600, 1200), 1, (800, 1333), (1200, 1600), (1200, 1600)),  # under 2x: full decode
    ],
)
def test_large_jpegs_decode_reduced_but_report_their_full_displayed_size(
    shared_data, stored, orientation, fit, reduced, full
):
    from PIL import Image

    data = large_jpeg(shared_data, *stored, orientation)
    decoded = images.decode_to_fit(data, fit)
    assert decoded.pixels.shape == (*reduced, 3) and (decoded.height, decoded.width) == full
    whole = images.decode(data)
    assert whole.shape[:2] == full and images.decode_to_fit(data, None).pixels.shape == whole.shape
    # The same picture: the full decode scaled down to the reduced size is close to it.
    scaled = np.asarray(Image.fromarray(whole).resize(reduced[::-1], Image.BOX), dtype=np.float32)
    assert np.abs(scaled - decoded.pixels).mean() < 3.0


def test_only_jpegs_decode_reduced(shared_data):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(images.decode(large_jpeg(shared_data, 2000, 1500))).save(png, "PNG")
    decoded = images.decode_to_fit(png.getvalue(), (320, 512))
    assert decoded.pixels.shape == (1500, 2000, 3) and (decoded.height, decoded.width) == (1500, 2000)


def test_a_jpeg_whose_data_ends_long_before_its_declared_size_is_corrupt(shared_data):
    """libjpeg pads the missing blocks of such a file without an error; a Huffman-coded JPEG
    spends at least a bit on every block, which a flat black progressive JPEG shows is enough."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
    fake = bytearray(buf.getvalue())
    struct.pack_into(">HH", fake, fake.find(b"\xff\xc0") + 5, 9000, 10000)  # declare 10000x9000
    with pytest.raises(images.ImageError, match=r"JPEG data ends early: \d+ bytes cannot hold 10000x9000") as err:
        images.decode(bytes(fake))
    assert err.value.kind == "corrupt"
    for progressive in (False, True):
        black = io.BytesIO()
        Image.new("L", (4000, 3000), 0).save(black, "JPEG", optimize=True, progressive=progressive)
        assert images.decode(black.getvalue()).shape == (3000, 4000, 3)
