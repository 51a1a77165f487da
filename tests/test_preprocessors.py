"""Control images: right size and mode, the polarity each ControlNet expects, and the model paths offline.

The learned annotators are exercised with tiny random networks: a random lineart generator saved as a
plain state dict (as sk_model.pth is), and tiny DPT / Depth Anything models built from configs and saved
with their image processors, so nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.models import preprocessors
from core.models.lineart import LineartGenerator
from core.models.preprocessors import (
    canny,
    depth,
    depth_fallback,
    lineart,
    lineart_fallback,
    make_control_image,
    unload_models,
)

SIZE = (200, 136)  # non-square, and 136 is not a multiple of 16
RECT = (50, 30, 150, 100)  # drawn inclusive: columns 50..150, rows 30..100


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Iterator[None]:
    unload_models()
    yield
    unload_models()


def _photo(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", SIZE, (90, 110, 130))
    ImageDraw.Draw(image).rectangle(RECT, fill=(200, 190, 170))
    return image.convert(mode)


def _white(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0] > 127


@pytest.mark.parametrize("make", [canny, lineart_fallback, depth_fallback])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_fallbacks_return_rgb_of_the_input_size(make: Callable[[Image.Image], Image.Image], mode: str) -> None:
    result = make(_photo(mode))
    assert result.mode == "RGB" and result.size == SIZE
    pixels = np.asarray(result)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


@pytest.mark.parametrize("kind", ["canny", "lineart", "depth"])
def test_make_control_image_dispatches_without_models(kind: str) -> None:
    result = make_control_image(kind, _photo())
    assert result.mode == "RGB" and result.size == SIZE


def test_canny_finds_the_rectangle_edges_and_nothing_in_flat_areas() -> None:
    edges = _white(canny(_photo()))
    near = np.zeros_like(edges)
    left, top, right, bottom = RECT
    near[top - 2 : bottom + 3, left - 2 : right + 3] = True
    near[top + 3 : bottom - 2, left + 3 : right - 2] = False
    assert edges.any() and not edges[~near].any()
    for column in (left, right):  # each vertical side is found along (almost) its whole length
        assert edges[top + 3 : bottom - 2, column - 2 : column + 3].any(axis=1).all()
    for row in (top, bottom):
        assert edges[row - 2 : row + 3, left + 3 : right - 2].any(axis=0).all()
    assert edges[top + 10, left - 2 : left + 3].sum() == 1  # non-maximum suppression: one pixel wide


def test_canny_sees_a_colour_edge_of_equal_brightness() -> None:
    image = Image.new("RGB", SIZE, (200, 100, 100))
    ImageDraw.Draw(image).rectangle((100, 0, 199, 135), fill=(100, 151, 100))  # same luminance, other hue
    assert _white(canny(image))[:, 97:103].any(axis=1).all()


def test_canny_on_a_flat_image_is_black() -> None:
    assert not _white(canny(Image.new("RGB", SIZE, (120, 120, 120)))).any()


def test_canny_hysteresis_without_scipy_matches_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(_photo(), dtype=np.float32) + rng.normal(0, 25, (SIZE[1], SIZE[0], 3)), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    with_scipy = np.asarray(canny(image, 60, 150))
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `from scipy import ndimage` fail
    np.testing.assert_array_equal(np.asarray(canny(image, 60, 150)), with_scipy)


def test_canny_rejects_swapped_thresholds() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        canny(_photo(), 200, 100)


def test_lineart_fallback_draws_white_lines_on_black() -> None:
    lines = np.asarray(lineart_fallback(_photo()))[..., 0]
    left, top, right, bottom = RECT
    assert lines[top + 20 : bottom - 20, left - 2 : left + 3].max(axis=1).min() > 64  # the edge is a bright line
    assert lines[top + 10 : bottom - 10, left + 10 : right - 10].max() == 0  # flat areas stay black
    assert lines[:, :40].max() == 0


def test_depth_fallback_puts_the_ground_nearer_than_the_sky() -> None:
    result = np.asarray(depth_fallback(Image.new("RGB", SIZE, (128, 128, 128))))[..., 0]
    assert result[-1].mean() > result[0].mean() + 200


def _save_lineart_weights(path: Path, bias: float | None = None) -> Path:
    """A random lineart generator saved as a plain state dict; `bias` forces the drawing's brightness."""
    torch.manual_seed(0)
    network = LineartGenerator()
    if bias is not None:
        with torch.no_grad():
            network.model4[1].weight.zero_()
            network.model4[1].bias.fill_(bias)
    torch.save(network.state_dict(), path)
    return path


def test_lineart_with_a_network_returns_rgb_of_the_input_size(tmp_path: Path) -> None:
    weights = _save_lineart_weights(tmp_path / "sk_model.pth")
    result = lineart(_photo(), str(weights), resolution=64)
    assert result.mode == "RGB" and result.size == SIZE


@pytest.mark.parametrize(("bias", "expected"), [(20.0, 0), (-20.0, 255)])
def test_lineart_network_output_is_inverted_to_white_lines_on_black(tmp_path: Path, bias: float, expected: int) -> None:
    """The annotator draws 1 = paper; the ControlNet wants paper black: a blank drawing must come out black."""
    weights = _save_lineart_weights(tmp_path / f"forced{bias}.pth", bias)
    result = np.asarray(lineart(_photo(), str(weights), resolution=64))
    assert (result == expected).all()


def test_lineart_rejects_a_file_that_is_not_an_annotator(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=r"sk_model\.pth or sk_model2\.pth"):
        lineart(_photo(), str(wrong), resolution=64)


def test_lineart_offline_says_what_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, filename: str) -> str:
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache and the hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"hf download lllyasviel/Annotators sk_model2\.pth.*model=None"):
        lineart(_photo(), "sk_model2.pth")


def test_lineart_unknown_name_lists_the_choices() -> None:
    with pytest.raises(FileNotFoundError, match=r"sk_model\.pth, sk_model2\.pth"):
        lineart(_photo(), "no_such_model.pth")


def _tiny_depth_model(folder: Path, kind: str) -> Path:
    """A few-kilobyte DPT or Depth Anything saved with its processor; the head's bias keeps the ReLU open."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessorPil,
    )

    torch.manual_seed(0)
    if kind == "dpt":
        config = DPTConfig(
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 8, 8, 8],
            fusion_hidden_size=8,
        )
        network = DPTForDepthEstimation(config)
        processor = DPTImageProcessorPil(size={"height": 32, "width": 32})
    else:
        backbone = Dinov2Config(
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=14,
            out_indices=[1, 2, 3, 4],
            reshape_hidden_states=False,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=16,
            neck_hidden_sizes=[8, 8, 8, 8],
            fusion_hidden_size=8,
            head_hidden_size=8,
            patch_size=14,
        )
        network = DepthAnythingForDepthEstimation(config)
        processor = DPTImageProcessorPil(
            size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14
        )
    last_conv = [module for module in network.head.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.bias.fill_(1.0)
    network.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["dpt", "depth_anything"])
def test_depth_with_a_tiny_transformers_model_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_depth_model(tmp_path / kind, kind)
    result = depth(_photo(), str(folder))
    assert result.mode == "RGB" and result.size == SIZE
    pixels = np.asarray(result)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255  # stretched to the full range
    assert make_control_image("depth", _photo(), str(folder)).size == SIZE


class _FakeDepthNetwork(torch.nn.Module):
    """Predicts a left-to-right ramp, so the test knows which side the model calls larger."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        ramp = torch.linspace(0, 10, 32).expand(1, 24, 32)
        return SimpleNamespace(predicted_depth=ramp)


@pytest.mark.parametrize(
    ("config", "right_is_bright"),
    [
        (SimpleNamespace(model_type="dpt"), True),  # inverse depth: larger = nearer = bright
        (SimpleNamespace(model_type="depth_anything", depth_estimation_type="metric"), False),
        (SimpleNamespace(model_type="zoedepth"), False),
    ],
)
def test_depth_is_near_bright_for_relative_and_metric_models(
    monkeypatch: pytest.MonkeyPatch, config: SimpleNamespace, right_is_bright: bool
) -> None:
    def processor(images: Image.Image, return_tensors: str) -> SimpleNamespace:
        return SimpleNamespace(to=lambda device: {"pixel_values": torch.zeros(1, 3, 24, 32)})

    monkeypatch.setattr(preprocessors, "_depth_model", lambda model, device: (processor, _FakeDepthNetwork(config)))
    row = np.asarray(depth(_photo(), "some/model"))[68, :, 0]
    assert (row[-1] > row[0]) == right_is_bright
    assert {int(row[0]), int(row[-1])} == {0, 255}


def test_depth_offline_says_what_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"hf download depth-anything/Depth-Anything-V2-Small-hf.*model=None"):
        depth(_photo(), "depth-anything/Depth-Anything-V2-Small-hf")


def test_depth_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        depth(_photo(), str(tmp_path / "missing" / "depth-model"))


def test_make_control_image_rejects_a_model_for_canny_and_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="canny takes no model"):
        make_control_image("canny", _photo(), "sk_model.pth")
    with pytest.raises(ValueError, match="'lineart', 'depth', 'canny'"):
        make_control_image("normal", _photo())  # type: ignore[arg-type]
