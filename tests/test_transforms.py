import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from resnext import ImageLoadError, Preprocessing, load_image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr", "I;16", "I", "F", "HSV"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10), 30000)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_16_bit_grey_is_scaled_not_clipped_to_white():
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    value = np.asarray(load_image(grey16))[0, 0]
    assert 120 <= value[0] <= 136 and value[0] == value[1] == value[2]


def test_transparent_pixels_become_white_not_black():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    p.info["transparency"] = 0
    assert np.asarray(load_image(p))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 (WxH) photo, left half red, right half blue, stored with "rotate 90 CW" (6).
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)  # turned to portrait
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # red on top after a clockwise turn
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_cmyk_jpeg_and_animated_gif_and_webp():
    cmyk = encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")  # red in CMYK
    assert np.asarray(load_image(cmyk))[8, 8, 0] > 200
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif.getvalue()).size == (8, 8)
    assert load_image(encoded(Image.new("RGB", (9, 7), (1, 2, 3)), "WEBP", lossless=True)).size == (9, 7)


def test_inputs_of_every_kind(tmp_path, photo):
    path = tmp_path / "p.png"
    Image.fromarray(photo).save(path)
    expected = np.asarray(Image.fromarray(photo))
    for source in (path, str(path), path.read_bytes(), Image.fromarray(photo), photo):
        assert np.array_equal(np.asarray(load_image(source)), expected)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((5, 6), np.uint8),
        np.zeros((5, 6, 1), np.uint8),
        np.zeros((5, 6, 4), np.uint8),
        np.full((5, 6, 3), 0.5, np.float32),
        np.full((5, 6, 3), 65535, np.uint16),
    ],
)
def test_numpy_arrays(array):
    assert load_image(array).size == (6, 5)


def test_float_and_uint16_arrays_are_scaled():
    assert np.asarray(load_image(np.full((2, 2, 3), 1.0)))[0, 0, 0] == 255
    assert np.asarray(load_image(np.full((2, 2, 3), 65535, np.uint16)))[0, 0, 0] == 255


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((5, 6, 2), np.uint8), "shape"),
        (np.zeros((5,), np.uint8), "shape"),
        (np.zeros((5, 6, 3), np.int64), "dtype"),
        (np.full((5, 6, 3), np.nan), "NaN"),
    ],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array)


def test_bad_files_are_refused_with_a_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(encoded(Image.new("RGB", (64, 64), (9, 90, 200)), "JPEG")[:300])
    binary = tmp_path / "data.jpg"
    binary.write_bytes(b"\x00\x9f\x92\x96" * 50)
    for path, reason in ((empty, "the file is empty"), (text, "this is text, not a photo"),
                         (binary, "not a photo in a format"), (truncated, "damaged or cut short")):
        with pytest.raises(ImageLoadError, match=reason) as err:
            load_image(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="dict"):
        load_image({})


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageLoadError, match="too large.*64,000,000"):
        load_image(png_declaring(100_000, 100_000))


def test_pixel_limit_is_configurable():
    small = encoded(Image.new("RGB", (100, 100)), "PNG")
    assert load_image(small, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(small, max_pixels=9_999)


def test_preprocessing_matches_resize_then_center_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3)
    )
    pre = Preprocessing(input_size=112, resize=128)
    ours = pre(image)
    reference = T.Compose(
        [T.PILToTensor(), T.Resize(128, antialias=True), T.CenterCrop(112), T.ToDtype(torch.float32, scale=True),
         T.Normalize(pre.mean, pre.std)]
    )(image)
    assert ours.shape == reference.shape == (3, 112, 112)
    assert (ours - reference).abs().mean() < 0.02  # one resample instead of two: same picture


def test_crop_box_is_centered_and_square():
    pre = Preprocessing(input_size=224, resize=256)
    left, top, right, bottom = pre.crop_box(400, 300)
    assert right - left == pytest.approx(300 * 224 / 256) == bottom - top
    assert (left + right) / 2 == pytest.approx(200) and (top + bottom) / 2 == pytest.approx(150)


def test_preprocessing_round_trips_and_validates():
    pre = Preprocessing(input_size=96, resize=110, interpolation="bicubic")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.with_size(192).resize == 220
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(input_size=224, resize=200)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="lanczos9")
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        Preprocessing.from_dict({"input_size": 224, "crop": 0.9})


def test_shrink_to_bounds_what_stays_in_memory(tmp_path):
    """Training keeps many photos decoded: each is shrunk as it is read, so its shorter side is
    ``shrink_to`` whatever the file declares (a JPEG is decoded at a reduced scale already)."""
    from resnext.training.context import decode

    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(big, quality=80)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 200), (200, 10, 10)).save(wide)
    assert load_image(big, shrink_to=150).size == (200, 150)
    assert load_image(wide, shrink_to=150).size == (2250, 150)
    assert load_image(big).size == (4000, 3000)  # only when asked
    small = tmp_path / "small.png"
    Image.new("RGB", (90, 60)).save(small)
    assert load_image(small, shrink_to=150).size == (90, 60)  # never enlarged
    shapes = [tuple(t.shape) for t in decode([big, wide, small], side=150)]
    # training keeps a photo at most twice ``side`` on its longer side too: a 15:1 photo kept at
    # 150 px high was 2250 px long (a zip of such photos took gigabytes)
    assert shapes == [(3, 150, 200), (3, 20, 300), (3, 60, 90)]


@pytest.fixture()
def resized(monkeypatch) -> list:
    """The sizes of the images ``Image.resize`` is called on, from now on."""
    sizes = []
    real = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(self.size)
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return sizes


def test_jpeg_is_drafted_not_decoded_in_full(tmp_path, resized):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(big, quality=80)
    resized.clear()
    load_image(big, shrink_to=150)
    assert resized == [(500, 375)]  # decoded at 1/8 scale, then resized once


def test_load_photo_bounds_the_longer_side_and_says_the_scale(tmp_path, resized):
    """A phone photo shown at 1,280 px: decoded at half its size already (not in full and then
    shrunk), its longer side bounded, and the scale that maps a box in the file's pixels onto it."""
    from resnext.transforms import load_photo

    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((4032, 3024), Image.Resampling.BILINEAR)
    big = tmp_path / "phone.jpg"
    scene.save(big, quality=90)
    resized.clear()
    photo, scale = load_photo(big, 1280)
    assert photo.size == (1280, 960) and scale == pytest.approx(1280 / 4032)
    assert resized == [(2016, 1512)]  # decoded at 1/2 scale: 1/4 would be under 1,280 px
    reference = np.asarray(load_image(big).resize((1280, 960), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(np.asarray(photo, dtype=float) - reference).mean() < 2.0  # the same picture
    png = tmp_path / "phone.png"
    scene.resize((2000, 1000)).save(png)
    assert load_photo(png, 1280)[0].size == (1280, 640) and load_photo(png, 1280)[1] == pytest.approx(0.64)
    assert load_photo(Image.new("RGB", (300, 200)), 1280) == (load_photo(Image.new("RGB", (300, 200)), 1280)[0], 1.0)
    rotated = tmp_path / "rotated.jpg"  # stored 4032 x 3024 with "rotate 90 CW": upright 3024 x 4032
    exif = Image.Exif()
    exif[0x0112] = 6
    scene.save(rotated, exif=exif, quality=90)
    upright, scale = load_photo(rotated, 1280)
    assert upright.size == (960, 1280) and scale == pytest.approx(1280 / 4032)
    with pytest.raises(ValueError, match="positive integer"):
        load_image(big, max_side=0)


def test_whole_framing_blurs_what_it_adds():
    """A wide photo framed whole: the bands added above and below are its edges stretched and
    blurred, not stripes continued (left sharp, non-square photos drifted by up to 27 points)."""
    a = np.full((100, 200, 3), 255, np.uint8)
    for x0 in range(0, 200, 20):
        a[:, x0 : x0 + 10] = 0  # vertical stripes, 20 px a period
    out = np.asarray(Preprocessing(64, 64, framing="whole").crop(Image.fromarray(a))).astype(float)
    inside, added = out[32, :, 0].std(), out[3, :, 0].std()  # the photo fills rows 16..47
    assert inside > 80 and added < 0.25 * inside
