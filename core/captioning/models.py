"""The captioning models: BLIP, BLIP-2 and Florence-2 through transformers, behind one `caption(images)` call.

A model is named by hub id or local folder; its `config.json` says which family it is, so a fine-tuned
checkpoint in a folder works like the published one. It runs on the GPU in fp16 when there is one (half
the memory, no visible loss for captions), else on the CPU in fp32. `open_captioner` frees the model
when the block ends, so training gets the GPU memory back. transformers is imported on first load,
not with this module: it takes seconds, and the app should not pay that until someone captions.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.captioning.backups import CaptioningError
from core.captioning.presets import FAMILIES, FLORENCE_TASKS, Family, pinned_revision
from core.common.errors import first_line

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise CaptioningError("device", f"{device!r} is not a device: use auto, cuda, cuda:1 or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CaptioningError("device", "no CUDA GPU is available here: use auto or cpu")
    return chosen


class Captioner:
    """A loaded model and processor that caption PIL images in batches; call `close` to free the memory."""

    def __init__(self, family: Family, model: Any, processor: Any, device: torch.device, prompt: str) -> None:
        self.family = family
        self.model: Any = model
        self.processor: Any = processor
        self.device = device
        self.prompt = prompt

    def caption(self, images: list[Image.Image], max_tokens: int, stop: threading.Event | None = None) -> list[str]:
        """One caption per image, the prompt not included; generation ends early once `stop` is set."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                stopped = stop is not None and stop.is_set()
                return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)

        inputs, prompt_tokens = self._inputs(images)
        try:
            with torch.inference_mode():
                # At least one new token: a model that ends at once would otherwise write an empty caption.
                stopping = StoppingCriteriaList([_Stop()])
                output = self.model.generate(
                    **inputs, max_new_tokens=max_tokens, min_new_tokens=1, stopping_criteria=stopping
                )
        except torch.OutOfMemoryError:
            raise CaptioningError(
                "batch_size", f"{len(images)} images at once ran out of GPU memory: lower the batch size"
            ) from None
        texts = self.processor.batch_decode(output[:, prompt_tokens:], skip_special_tokens=True)
        return [_one_line(text) for text in texts]

    def close(self) -> None:
        """Drop the model and hand its GPU memory back to the allocator's pool and to other processes."""
        self.model = self.processor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], int]:
        """Model inputs on the device, and how many leading output tokens repeat the prompt.

        BLIP's output starts with its start token and the prompt (without the separator), decoder-only
        BLIP-2 repeats the whole input, and Florence-2's encoder-decoder output holds only new text.
        """
        count = len(images)
        if self.family == "florence2":
            batch = self.processor(images=images, text=[self.prompt] * count, return_tensors="pt")
            prompt_tokens = 0
        elif self.family == "blip":
            text = [self.prompt] * count if self.prompt else None
            batch = self.processor(images=images, text=text, return_tensors="pt")
            prompt_tokens = batch["input_ids"].shape[1] - 1 if self.prompt else 0
        else:
            batch = self.processor(images=images, text=[self.prompt] * count, return_tensors="pt")
            decoder_only = not self.model.config.text_config.is_encoder_decoder
            prompt_tokens = batch["input_ids"].shape[1] if decoder_only else 0
        inputs = {name: value.to(self.device) for name, value in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs, prompt_tokens


@contextmanager
def open_captioner(
    model: str, *, revision: str | None = None, device: str = "auto", task: str = "<CAPTION>", prompt: str = ""
) -> Iterator[Captioner]:
    """Load `model` (hub id or folder) for captioning; it is freed when the block ends, even on an error.

    `task` steers Florence-2 (one of FLORENCE_TASKS); `prompt` steers BLIP and BLIP-2 (text the caption
    continues, or a question such as "Question: what style is the building? Answer:").
    """
    captioner = load_captioner(model, revision=revision, device=device, task=task, prompt=prompt)
    try:
        yield captioner
    finally:
        captioner.close()


def load_captioner(
    model: str, *, revision: str | None = None, device: str = "auto", task: str = "<CAPTION>", prompt: str = ""
) -> Captioner:
    """The loaded captioner; prefer `open_captioner`, which also frees it."""
    import transformers

    target = resolve_device(device)
    source, revision = _source(model, revision)
    family = _family(model, source, revision)
    if family == "florence2" and task not in FLORENCE_TASKS:
        raise CaptioningError("task", f"{task!r} is not a captioning task of Florence-2: use one of {FLORENCE_TASKS}")
    classes = {
        "blip": transformers.BlipForConditionalGeneration,
        "blip2": transformers.Blip2ForConditionalGeneration,
        "florence2": transformers.Florence2ForConditionalGeneration,
    }
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    log.info("loading captioner %s (%s) on %s in %s", model, family, target, dtype)
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, revision=revision)
        network = classes[family].from_pretrained(source, revision=revision, dtype=dtype)
    except (OSError, ValueError) as error:
        raise CaptioningError(
            "model", f"{model!r} could not be loaded: {first_line(error, type(error).__name__)}"
        ) from None
    if family == "blip2":
        _upgrade_legacy_blip2(network, processor)
    try:
        network.to(target).eval()
    except torch.OutOfMemoryError:
        del network
        gc.collect()
        torch.cuda.empty_cache()
        reason = "does not fit in the GPU's free memory: close what else uses it, or use a smaller model or cpu"
        raise CaptioningError("model", f"{model!r} {reason}") from None
    return Captioner(family, network, processor, target, task if family == "florence2" else prompt)


def _source(model: str, revision: str | None) -> tuple[str, str | None]:
    """A folder path, or the hub id with its pinned revision; a path that is not a folder is named as such."""
    model = model.strip()
    if not model:
        raise CaptioningError("model", "none chosen: pick a preset, or give a hub id or a model folder")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise CaptioningError("model", f"{model!r} is a file: choose the folder that holds config.json")
    looks_like_path = path.is_absolute() or model.startswith((".", "~")) or "\\" in model or model.count("/") > 1
    if looks_like_path:
        raise CaptioningError("model", f"folder {model!r} not found: check the path")
    return model, revision if revision is not None else pinned_revision(model)


def _family(model: str, source: str, revision: str | None) -> Family:
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except OSError as error:
        raise CaptioningError(
            "model",
            f"{model!r} is not a model folder here and could not be fetched from the Hugging Face hub "
            f"({first_line(error, type(error).__name__)}): check the id or path, or connect to the internet once "
            "to download it",
        ) from None
    model_type = config.get("model_type", "")
    if model_type == "florence2" and "auto_map" in config:
        raise CaptioningError(
            "model",
            f"{model!r} is a remote-code Florence-2 checkpoint: use the native florence-community/Florence-2-base "
            "or -large",
        )
    if model_type not in FAMILIES:
        raise CaptioningError(
            "model", f"{model!r} is a {model_type or 'unknown'} model: choose a BLIP, BLIP-2 or Florence-2 captioner"
        )
    return FAMILIES[model_type]


def _upgrade_legacy_blip2(model: Any, processor: Any) -> None:
    """Give a BLIP-2 checkpoint saved before transformers 4.47 the image-token layout generation expects.

    Those checkpoints (the pinned one among them) have no image token id in their config and no query
    count in their processor; the processor adds the `<image>` token itself. The rows OPT pads its
    vocabulary to hold it; a checkpoint without spare rows gets one more embedding.
    """
    if model.config.image_token_index is not None and processor.num_query_tokens is not None:
        return
    token = processor.image_token
    token_id = processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))
    if token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(token_id + 1)
    model.config.image_token_index = token_id
    processor.num_query_tokens = model.config.num_query_tokens
    log.info("BLIP-2 checkpoint in the pre-4.47 layout: image token %d added", token_id)


def _one_line(text: str) -> str:
    """A caption file holds one line of printable text; generated text can hold newlines or control bytes."""
    printable = "".join(char if char.isprintable() else " " for char in text)
    return " ".join(printable.split())
