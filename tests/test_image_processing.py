"""Image loading (every PIL mode, EXIF, arrays, URLs, errors) and OFA's square resize + normalisation."""

from __future__ import annotations

import functools
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor


def _pixel(image: Image.Image) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def _palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


MODE_CASES = {
    "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    "L": (Image.new("L", (4, 4), 100), (100, 100, 100)),
    "LA opaque": (Image.new("LA", (4, 4), (100, 255)), (100, 100, 100)),
    "LA transparent": (Image.new("LA", (4, 4), (100, 0)), (255, 255, 255)),
    "P": (_palette_image(None), (255, 0, 0)),
    "P transparent": (_palette_image(0), (255, 255, 255)),
    "RGBA half": (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    "YCbCr": (Image.new("YCbCr", (4, 4), (128, 128, 128)), (128, 128, 128)),
    "LAB": (Image.new("LAB", (4, 4), (255, 128, 128)), (254, 255, 254)),
    "I;16 mid": (Image.fromarray(np.full((4, 4), 32768, np.uint16)), (128, 128, 128)),
    "I;16 max": (Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
    "I;16B mid": (Image.fromarray(np.full((4, 4), 32768, ">u2")), (128, 128, 128)),
    "I 16-bit data": (Image.fromarray(np.full((4, 4), 32768, np.int32)), (128, 128, 128)),
    "F in [0, 1]": (Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_every_mode_to_rgb(name):
    image, expected = MODE_CASES[name]
    got = _pixel(load_image(image))
    assert np.allclose(got, expected, atol=1), (name, image.mode, got)


def test_wide_range_int_and_float_images_use_their_range():
    ints = np.array([[-1000, 0], [500, 99000]], np.int32)  # outside 0..65535: min..max -> 0..255
    got = np.asarray(load_image(Image.fromarray(ints)))[..., 0]
    assert got.tolist() == [[0, 3], [4, 255]]
    floats = np.array([[0.0, 5.0], [10.0, -3.0]], np.float32)  # max > 1: divided by the max, negatives -> 0
    got = np.asarray(load_image(Image.fromarray(floats)))[..., 0]
    assert got.tolist() == [[0, 128], [255, 0]]


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 5), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.size == (5, 6) and np.allclose(_pixel(image), 128, atol=1)


def _exif_jpeg(path, orientation: int) -> None:
    """A 40x20 JPEG, left half red and right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation, top_color", [(6, (255, 0, 0)), (8, (0, 0, 255))])
def test_exif_orientation(tmp_path, orientation, top_color):
    path = tmp_path / f"rotated_{orientation}.jpg"
    _exif_jpeg(path, orientation)
    for source in (path, str(path), Image.open(path)):
        image = load_image(source)
        assert image.size == (20, 40)  # portrait after applying the tag
        assert np.allclose(image.getpixel((10, 2)), top_color, atol=40)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((3, 5), 100, np.uint8), (100, 100, 100)),
        (np.full((3, 5, 1), 100, np.uint8), (100, 100, 100)),
        (np.tile(np.array([1, 2, 3], np.uint8), (3, 5, 1)), (1, 2, 3)),
        (np.tile(np.array([0, 0, 0, 0], np.uint8), (3, 5, 1)), (255, 255, 255)),  # transparent -> white
        (np.tile(np.array([1, 2, 3, 255], np.uint8), (3, 5, 1))[:, ::-1], (1, 2, 3)),  # non-contiguous view
    ],
)
def test_array_inputs(array, expected):
    image = load_image(array)
    assert image.size == (5, 3)
    assert _pixel(image) == expected


def test_output_shapes_and_normalisation(tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (30, 10), "white").save(path)
    processor = OFAUFOImageProcessor(size=48)
    out = processor([path, np.zeros((7, 9, 3), np.uint8), Image.new("L", (3, 4), 128)])
    assert out["pixel_values"].shape == (3, 3, 48, 48) and out["pixel_values"].dtype == torch.float32
    assert set(out) == {"pixel_values"}  # only what the model takes, unless asked
    sizes = processor([path, np.zeros((7, 9, 3), np.uint8), Image.new("L", (3, 4), 128)], return_original_sizes=True)
    assert sizes["original_sizes"].tolist() == [[30, 10], [9, 7], [3, 4]]
    assert sizes["original_sizes"].dtype == torch.int64
    assert torch.equal(sizes["pixel_values"], out["pixel_values"])
    assert torch.all(out["pixel_values"][0] == 1.0) and torch.all(out["pixel_values"][1] == -1.0)
    assert torch.allclose(out["pixel_values"][2], torch.tensor(128 / 255 * 2 - 1), atol=1e-6)
    single = processor(np.zeros((7, 9, 3), np.uint8), return_tensors="np")
    assert isinstance(single["pixel_values"], np.ndarray) and single["pixel_values"].shape == (1, 3, 48, 48)


def test_square_bicubic_resize_matches_pil():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    out = OFAUFOImageProcessor(size=32)(array)["pixel_values"][0]
    expected = np.asarray(Image.fromarray(array).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
    assert torch.allclose(out, torch.from_numpy((expected / 255 - 0.5) / 0.5).permute(2, 0, 1))


def test_save_load_round_trip(tmp_path):
    processor = OFAUFOImageProcessor(size=64, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.4))
    processor.save_pretrained(tmp_path)
    loaded = OFAUFOImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.size, loaded.image_mean, loaded.resample) == (64, (0.4, 0.5, 0.6), Image.Resampling.BICUBIC)
    array = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    assert torch.equal(loaded(array)["pixel_values"], processor(array)["pixel_values"])


def _truncated(tmp_path, suffix: str) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / f"full{suffix}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    return str(cut)


def test_file_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"image file not found: .*missing\.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.png: not an image file"):
        load_image(text)
    for suffix in (".png", ".jpg"):
        path = _truncated(tmp_path, suffix)
        with pytest.raises(ImageLoadError, match=rf"cut\{suffix}: cannot decode image.*truncated"):
            load_image(path)


@pytest.mark.parametrize(
    "value, match",
    [
        (Image.new("RGB", (0, 5)), r"no pixels \(width x height = 0 x 5\)"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        (np.zeros((4, 4, 3), np.float32), "dtype float32.*expected dtype uint8"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\).*expected shape"),
        (np.zeros((1, 4, 4, 3), np.uint8), "expected shape"),
        (12, "unsupported image input of type int"),
        (b"bytes", "unsupported image input of type bytes"),
    ],
)
def test_input_errors(value, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(value)


def test_error_type_and_empty_batch():
    assert issubclass(ImageLoadError, ValueError)
    with pytest.raises(ValueError, match="no images"):
        OFAUFOImageProcessor()([])
    with pytest.raises(ValueError, match="size must be a positive number"):
        OFAUFOImageProcessor(size=0)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def _without_proxy(monkeypatch) -> None:
    """A proxy from the environment must not stand between the tests and 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def _png_bytes(folder) -> bytes:
    path = folder / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """`tmp_path` served over HTTP by a thread on 127.0.0.1: yields (folder, base URL)."""
    _without_proxy(monkeypatch)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_loads_the_files_pixels(served):
    folder, base = served
    array = np.random.default_rng(0).integers(0, 256, (12, 17, 4), dtype=np.uint8)
    array[..., 3] = 255  # opaque RGBA: the same RGB rules as a file apply
    Image.fromarray(array).save(folder / "photo.png")
    from_url = load_image(f"{base}/photo.png")
    assert from_url.mode == "RGB" and from_url.size == (17, 12)
    assert np.array_equal(np.asarray(from_url), np.asarray(load_image(folder / "photo.png")))
    assert np.array_equal(np.asarray(from_url), array[..., :3])
    pixels = OFAUFOImageProcessor(size=8)([f"{base}/photo.png"], return_original_sizes=True)
    assert pixels["original_sizes"].tolist() == [[17, 12]]


def test_url_errors_name_the_url(served):
    folder, base = served
    with pytest.raises(ImageLoadError, match=rf"could not fetch image URL {base}/missing\.png: HTTP 404"):
        load_image(f"{base}/missing.png")
    (folder / "notes.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match=rf"{base}/notes\.png: not an image file that PIL can read"):
        load_image(f"{base}/notes.png")
    (folder / "cut.png").write_bytes(_png_bytes(folder)[:200])
    with pytest.raises(ImageLoadError, match=rf"{base}/cut\.png: cannot decode image"):
        load_image(f"{base}/cut.png")


def test_unreachable_url_says_it_could_not_be_fetched(monkeypatch):
    _without_proxy(monkeypatch)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/photo.jpg"
    with pytest.raises(ImageLoadError, match=rf"could not fetch image URL {url} \(offline or refused\?\)"):
        load_image(url)
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/photo.jpg"
        with pytest.raises(ImageLoadError, match=rf"could not fetch image URL {url}: no answer within 0.3 s"):
            load_image(url, timeout=0.3)


def test_only_http_schemes_are_urls(tmp_path, monkeypatch):
    """A local file whose name merely starts like a URL is a file (as in transformers)."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (3, 2), "red").save(tmp_path / "http_example.png")
    assert load_image("http_example.png").size == (3, 2)
    with pytest.raises(ImageLoadError, match="image file not found: ftp:/host/photo.png"):
        load_image("ftp://host/photo.png")
