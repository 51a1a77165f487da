"""Control images for ControlNet from a photo of a real building: line art, depth and Canny edges.

Every function takes any PIL image and returns RGB of exactly the input's size, in the polarity the
SD 1.5 ControlNets were trained on:
- canny: white edges on black (control_v11p_sd15_canny).
- lineart: white lines on black. The annotator network draws dark lines on white paper; ControlNet's
  own annotator inverts that before training (control_v11p_sd15_lineart), so we do too.
- depth: near is bright, far is dark (control_v11f1p_sd15_depth, trained on MiDaS-style inverse depth).

The learned annotators (lineart weights, transformers depth models) come from the hub and are cached
after the first load; with `model=None` each falls back to a weight-free estimate in numpy, so the app
works offline and tests need no downloads. Only numpy, Pillow and torch are used (no OpenCV);
scipy, when installed, speeds up Canny's hysteresis.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.inference.masks import gaussian_blur
from core.models.lineart import LineartGenerator

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedModel

logger = logging.getLogger(__name__)

ControlKind = Literal["lineart", "depth", "canny"]

ANNOTATORS_REPO = "lllyasviel/Annotators"
# File names in ANNOTATORS_REPO: "realistic" (fine) and "coarse" line art.
LINEART_WEIGHTS = ("sk_model.pth", "sk_model2.pth")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_TAN_22_5 = math.tan(math.radians(22.5))
_TAN_67_5 = math.tan(math.radians(67.5))
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

# XDoG at a short side of 512 px: fine and coarse Gaussians, sharpening gain, threshold and softness. The
# response peaks at about 2.1 x the step in a channel (0–1), so a 10% step draws a clear line (~0.6) and
# steps under 5% (sensor and JPEG noise, soft shading) draw none.
_XDOG_SIGMA = 0.9
_XDOG_K = 1.6
_XDOG_GAIN = 20.0
_XDOG_EPSILON = 0.1
_XDOG_PHI = 6.0

# Depth models whose output grows with distance (metric depth); the others predict inverse depth.
_DISTANCE_MODEL_TYPES = frozenset({"zoedepth", "glpn"})


def _luminance(image: Image.Image) -> np.ndarray:
    """Rec. 601 luminance in float32, 0–255, the weighting of Pillow's "L" without its rounding."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) @ _LUMA


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x to the right, y downwards) with replicated edges, like OpenCV's."""
    padded = np.pad(gray, 1, mode="edge")
    dx = padded[:, 2:] - padded[:, :-2]
    dy = padded[2:] - padded[:-2]
    return dx[:-2] + 2 * dx[1:-1] + dx[2:], dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]


def _to_rgb(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A 0–255 map as an RGB image of `size` (bilinear when the map was computed at another size)."""
    gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    return gray.convert("RGB")


def _working_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """`size` scaled so its short side is `resolution`, both sides multiples of 8.

    Line annotators draw lines a fixed number of pixels wide, so they run at the ~512 px their
    ControlNet saw in training whatever the photo's size; 8 divides the generator's two downsamplings.
    """
    if resolution < 8:
        raise ValueError(f"resolution={resolution}: the annotator needs at least 8 pixels on the short side")
    scale = resolution / min(size)
    width, height = (max(8, round(side * scale / 8) * 8) for side in size)
    return width, height


def canny(image: Image.Image, low: int = 100, high: int = 200, *, sigma: float = 1.0) -> Image.Image:
    """Canny edges, white on black, at the input's size.

    Each RGB channel is smoothed (Gaussian, `sigma` px) and differentiated with 3×3 Sobel; per pixel the
    channel with the strongest gradient counts, as in cv2.Canny on a colour image (ControlNet's annotator),
    so a beige wall against a blue sky of similar brightness still has an edge. Then non-maximum
    suppression along the gradient (4 directions) thins edges to one pixel, and pixels above `high` seed
    edges that extend through 8-connected pixels above `low` (hysteresis). `low`/`high` use OpenCV's
    units (|gx| + |gy| of the Sobel on 0–255 values), so the usual 100/200 carry over; the smoothing makes
    it ignore a little more noise than cv2.Canny on raw pixels.
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds low={low}, high={high}: need 0 <= low <= high")
    channels = np.asarray(image.convert("RGB"), dtype=np.float32)
    # (2, 3, H, W): x and y derivatives of each channel.
    gx, gy = np.stack([_sobel(gaussian_blur(channels[..., c], sigma)) for c in range(3)], axis=1)
    magnitudes = np.abs(gx) + np.abs(gy)
    strongest = magnitudes.argmax(axis=0)[None]
    magnitude, gx, gy = (np.take_along_axis(values, strongest, axis=0)[0] for values in (magnitudes, gx, gy))
    height, width = magnitude.shape
    padded = np.pad(magnitude, 1)

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    ax, ay = np.abs(gx), np.abs(gy)
    along_x = ay <= _TAN_22_5 * ax  # gradient within 22.5° of the x axis: compare left and right
    along_y = ay > _TAN_67_5 * ax
    diagonal = ~along_x & ~along_y
    falling = diagonal & (gx * gy > 0)  # gradient towards bottom-right (y grows downwards)
    rising = diagonal & ~falling
    maximum = np.zeros_like(along_x)
    for where, (dy, dx) in ((along_x, (0, 1)), (along_y, (1, 0)), (falling, (1, 1)), (rising, (1, -1))):
        peak = (magnitude > shifted(-dy, -dx)) & (magnitude >= shifted(dy, dx))
        maximum |= where & peak
    edges = _hysteresis(maximum & (magnitude > high), maximum & (magnitude > low))
    return _to_rgb(np.where(edges, 255.0, 0.0), image.size)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The 8-connected components of `weak` that contain a `strong` pixel."""
    try:
        from scipy import ndimage
    except ImportError:
        return _flood(strong, weak)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[labels[strong]] = True
    keep[0] = False
    return keep[labels]


def _flood(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """`_hysteresis` without scipy: grow from the strong pixels one ring at a time until nothing changes."""
    edges = strong & weak
    height, width = edges.shape
    while True:
        padded = np.pad(edges, 1)
        grown = edges.copy()
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + height, dx : dx + width]
        grown &= weak
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def lineart_fallback(image: Image.Image, *, resolution: int = 512) -> Image.Image:
    """Weight-free line art by XDoG: white lines on black, as the lineart ControlNet expects.

    Each RGB channel (at a short side of `resolution`) is blurred at two scales; XDoG's sharpened image
    fine − gain·(coarse − fine) is soft-thresholded (tanh) against the local brightness `fine`, and the
    strongest channel counts, so a line appears on the dark side of every colour or brightness edge while
    flat areas, even dark ones, stay empty (classic XDoG thresholds absolute brightness and fills dark
    walls with black, which the ControlNet would read as a mass of lines). A stand-in for the annotator
    network, not its equal.
    """
    work = image.convert("RGB").resize(_working_size(image.size, resolution), Image.Resampling.BICUBIC)
    channels = np.asarray(work, dtype=np.float32) / 255
    response = np.max(
        [
            gaussian_blur(channels[..., c], _XDOG_SIGMA * _XDOG_K) - gaussian_blur(channels[..., c], _XDOG_SIGMA)
            for c in range(3)
        ],
        axis=0,
    )
    lines = np.tanh(_XDOG_PHI * np.maximum(_XDOG_GAIN * response - _XDOG_EPSILON, 0))
    return _to_rgb(lines * 255, image.size)


def _lineart_weights(model: str) -> Path:
    """A local .pth path as given, or one of LINEART_WEIGHTS fetched from (or found in) the hub cache."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if model not in LINEART_WEIGHTS:
        raise FileNotFoundError(
            f"lineart model {model!r} is not a file: pass the path of a .pth annotator, one of "
            f"{', '.join(LINEART_WEIGHTS)} (downloaded from {ANNOTATORS_REPO}), or None for the built-in line finder"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ANNOTATORS_REPO, model))
    except OSError as error:
        raise OSError(
            f"could not get {model} from {ANNOTATORS_REPO} ({error}). Download it once while online "
            f"(`hf download {ANNOTATORS_REPO} {model}`), pass the path of a local copy, or use model=None for "
            "the built-in line finder"
        ) from error


@functools.lru_cache(maxsize=2)
def _lineart_network(weights: str, device: str) -> LineartGenerator:
    network = LineartGenerator()
    try:
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{weights} is not a lineart annotator state dict ({error}): use sk_model.pth or sk_model2.pth "
            f"from {ANNOTATORS_REPO}"
        ) from error
    logger.info("loaded lineart annotator %s on %s", weights, device)
    return network.to(device).eval()


def lineart(
    image: Image.Image, model: str | None = None, *, device: str | torch.device = "cpu", resolution: int = 512
) -> Image.Image:
    """Line art for the lineart ControlNet: white lines on black, at the input's size.

    `model` is a local .pth of the annotator, or "sk_model.pth" (realistic) / "sk_model2.pth" (coarse)
    from lllyasviel/Annotators; None uses `lineart_fallback`. The network runs at a short side of
    `resolution` px, like ControlNet's annotator, and its dark-on-white drawing is inverted.
    """
    if model is None:
        return lineart_fallback(image, resolution=resolution)
    target = torch.device(device)
    network = _lineart_network(str(_lineart_weights(model)), str(target))
    work = image.convert("RGB").resize(_working_size(image.size, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(work, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(target)
    with torch.inference_mode():
        paper = network(pixels)[0, 0].float().cpu().numpy()
    return _to_rgb(255 - paper * 255, image.size)


def depth_fallback(image: Image.Image) -> Image.Image:
    """A rough weight-free depth stand-in, near = bright: for when no depth model is available.

    Photos of buildings are mostly ground at the bottom (near) and sky at the top (far), and detailed
    surfaces (facades, foliage) are nearer than smooth ones (sky, haze), so the estimate blends a
    vertical ramp (65%) with blurred edge density (35%), at a short side of 128 px and smoothed. It only
    gives the depth ControlNet a plausible layout; use a depth model for real geometry.
    """
    rgb = image.convert("RGB")
    scale = min(1.0, 128 / min(rgb.size))
    small = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    gx, gy = _sobel(_luminance(small) / 255)
    detail = gaussian_blur(np.abs(gx) + np.abs(gy), min(small.size) / 16)
    detail = np.clip(detail / max(float(np.percentile(detail, 99)), 1e-6), 0, 1)
    ramp = np.broadcast_to(np.linspace(0, 1, small.height, dtype=np.float32)[:, None], detail.shape)
    estimate = gaussian_blur(0.65 * ramp + 0.35 * detail, min(small.size) / 64)
    return _to_rgb(_normalise(estimate), image.size)


def _normalise(values: np.ndarray) -> np.ndarray:
    """Stretch to 0–255; a constant map (no depth cue at all) becomes black rather than noise."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(1.0, abs(high)):
        return np.zeros_like(values)
    return (values - low) / (high - low) * 255


@functools.lru_cache(maxsize=1)
def _depth_model(model: str, device: str) -> tuple[BaseImageProcessor, PreTrainedModel]:
    """(image processor, depth network) for a hub id or a local folder; cached, as loading takes seconds."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    if not Path(model).expanduser().is_dir() and not _HUB_ID.fullmatch(model):
        raise FileNotFoundError(
            f"depth model {model!r} is neither a folder nor a hub id: pass a transformers depth-estimation "
            "model such as 'depth-anything/Depth-Anything-V2-Small-hf' or its local folder, or None for the "
            "rough built-in estimate"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(model)
        network = AutoModelForDepthEstimation.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise OSError(
            f"could not load depth model {model!r} ({error}). Download it once while online "
            f"(`hf download {model}`), pass its local folder, or use model=None for the rough built-in estimate"
        ) from error
    logger.info("loaded depth model %s on %s", model, device)
    return processor, network.to(device).eval()


def _predicts_distance(config: object) -> bool:
    """Whether larger outputs mean farther (metric depth) rather than nearer (relative inverse depth)."""
    metric = getattr(config, "depth_estimation_type", "relative") == "metric"
    return metric or getattr(config, "model_type", "") in _DISTANCE_MODEL_TYPES


def depth(image: Image.Image, model: str | None = None, *, device: str | torch.device = "cpu") -> Image.Image:
    """Depth map for the depth ControlNet: near bright, far dark, stretched to 0–255, RGB at the input's size.

    `model` is a transformers depth-estimation model (hub id or local folder), e.g.
    "depth-anything/Depth-Anything-V2-Small-hf" or "Intel/dpt-hybrid-midas"; None uses `depth_fallback`.
    Relative models (DPT/MiDaS, Depth Anything) predict inverse depth, which is already near = bright;
    metric ones (ZoeDepth, GLPN, Depth Anything "metric") predict distance and are inverted.
    """
    if model is None:
        return depth_fallback(image)
    target = torch.device(device)
    processor, network = _depth_model(str(model), str(target))
    inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(target)
    with torch.inference_mode():
        predicted = network(**inputs).predicted_depth
    size = (image.height, image.width)
    predicted = F.interpolate(predicted[:, None].float(), size=size, mode="bicubic", align_corners=False)
    values = predicted[0, 0].cpu().numpy()
    if _predicts_distance(network.config):
        values = -values
    return _to_rgb(_normalise(values), image.size)


def make_control_image(
    kind: ControlKind, image: Image.Image, model: str | None = None, *, device: str | torch.device = "cpu"
) -> Image.Image:
    """The control image of `kind` for `image`, with `model` for the learned annotators (None = fallback)."""
    if kind == "canny":
        if model is not None:
            raise ValueError(f"canny takes no model (got {model!r}): leave the model empty for canny")
        return canny(image)
    if kind == "lineart":
        return lineart(image, model, device=device)
    if kind == "depth":
        return depth(image, model, device=device)
    raise ValueError(f"control image kind {kind!r}: choose one of 'lineart', 'depth', 'canny'")


def unload_models() -> None:
    """Forget the cached annotator and depth networks, e.g. to hand their memory to the diffusion model."""
    _lineart_network.cache_clear()
    _depth_model.cache_clear()
