"""Model families (SD 1.x, SD 2.x, SDXL): what differs between them, and which one a model is.

Everything the engine does differently per family reads it from a `ModelFamily` here: default resolution and
prediction type, how many text encoders and their kohya prefixes, the metadata strings kohya sd-scripts writes
(`library/model_util.py` `get_model_version_str_for_sd1_sd2`, `sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`,
`library/sai_model_spec.py` ARCH_*), and the bundled config folder that loads a single file offline. Detection
reads only configs and checkpoint key names, never weights, and imports no ML library: Check runs it on every
press and the UI process starts without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from core.common.errors import first_line

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class ModelFamily:
    """One family of base models: the values that differ, nothing that can be read from the model itself."""

    key: str
    label: str
    resolution: int
    prediction_type: str  # "epsilon" or "v_prediction": the default when the model does not say
    text_encoders: int
    kohya_text_prefixes: tuple[str, ...]  # one per text encoder
    kohya_ldm_unet_names: bool  # sd-scripts trains SDXL on the LDM (sgm) UNet, so its LoRA keys use LDM names
    base_model_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture without the "/lora" adapter suffix
    config_folder: str  # under assets/: the configs a single file is read with
    tokenizer_pads: tuple[str, ...]  # each tokenizer's padding token: OpenCLIP's tokenizers pad with "!"

    @property
    def config_dir(self) -> Path:
        return ASSETS / self.config_folder

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoders == 2

    def describe(self) -> str:
        """What the Check summary shows, e.g. "SDXL 1.0, 1024 px"."""
        return f"{self.label}, {self.resolution} px"


SD1 = ModelFamily(
    key="sd1",
    label="SD 1.x",
    resolution=512,
    prediction_type="epsilon",
    text_encoders=1,
    kohya_text_prefixes=("lora_te_",),
    kohya_ldm_unet_names=False,
    base_model_version="sd_v1",
    architecture="stable-diffusion-v1",
    config_folder="sd15",
    tokenizer_pads=("<|endoftext|>",),
)
SD2 = replace(
    SD1,
    key="sd2",
    label="SD 2.x",
    base_model_version="sd_v2",
    architecture="stable-diffusion-v2-512",
    config_folder="sd2",
    tokenizer_pads=("!",),
)
SD2_V = replace(
    SD2,
    key="sd2-v",
    label="SD 2.x v-prediction",
    resolution=768,
    prediction_type="v_prediction",
    base_model_version="sd_v2_v",
    architecture="stable-diffusion-v2-768-v",
    config_folder="sd2-v",
)
SDXL = replace(
    SD1,
    key="sdxl",
    label="SDXL 1.0",
    resolution=1024,
    text_encoders=2,
    kohya_text_prefixes=("lora_te1_", "lora_te2_"),
    kohya_ldm_unet_names=True,
    base_model_version="sdxl_base_v1-0",
    architecture="stable-diffusion-xl-v1-base",
    config_folder="sdxl",
    tokenizer_pads=("<|endoftext|>", "!"),
)
FAMILIES = {family.key: family for family in (SD1, SD2, SD2_V, SDXL)}


class FamilyError(ValueError):
    """A model's family cannot be told, or it is one Atelier does not handle; the message names the file."""


def family_for(sdxl: bool, v2: bool, prediction_type: str | None) -> ModelFamily:
    """The family of a model whose own prediction type (when it states one) picks between SD 2.x's variants."""
    if sdxl:
        return SDXL
    if not v2:
        return SD1
    return SD2_V if (prediction_type or SD2_V.prediction_type) == "v_prediction" else SD2


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise FamilyError(f"{path} cannot be read ({first_line(error)}); the model folder is damaged") from error
    if not isinstance(data, dict):
        raise FamilyError(f"{path} is not a JSON object; the model folder is damaged")
    return data


def detect_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers folder, from model_index.json, the UNet config and the scheduler config.

    SDXL has `addition_embed_type = "text_time"` (and a StableDiffusionXL pipeline class); SD 2.x has
    1024-wide cross attention through linear projections; the scheduler's `prediction_type` tells 2.x's
    512 epsilon base from its 768 v-prediction model.
    """
    folder = Path(folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    prediction = _json(scheduler_file).get("prediction_type") if scheduler_file.is_file() else None
    return family_from_configs(_json(folder / "model_index.json"), _json(folder / "unet" / "config.json"), prediction)


def family_from_configs(index: dict, unet: dict, prediction: str | None, name: str = "the model") -> ModelFamily:
    """The family from a model's model_index.json, UNet config and scheduler prediction type (see detect_folder)."""
    class_name = str(index.get("_class_name", ""))
    sdxl = unet.get("addition_embed_type") == "text_time" or class_name.startswith("StableDiffusionXL")
    if sdxl and not (index.get("text_encoder") or [None])[0]:
        raise FamilyError(f"{name} has no first text encoder: an SDXL refiner, not a base model to train on")
    cross = unet.get("cross_attention_dim")
    v2 = not sdxl and (cross == 1024 or (bool(unet.get("use_linear_projection")) and cross != 768))
    return family_for(sdxl, v2, prediction)


SDXL_MARKER = "conditioner.embedders.1."  # SDXL's second (OpenCLIP bigG) text encoder
SD2_MARKER = "cond_stage_model.model."  # SD 2.x's OpenCLIP ViT-H text encoder
SD1_MARKER = "cond_stage_model.transformer."  # SD 1.x's CLIP ViT-L text encoder (transformers layout)
V_PRED_MARKER = "v_pred"  # the key ComfyUI and v-prediction fine-tunes store to say so


def detect_keys(keys: Iterable[str], name: str = "the checkpoint") -> ModelFamily:
    """The family of an LDM/A1111 single-file checkpoint from its key names.

    A checkpoint stores no prediction type unless it carries a `v_pred` key; an SD 2.x file without one is
    taken as 768 v-prediction (the 2.0/2.1 release models and most fine-tunes, and what diffusers assumes);
    `model.prediction_type = "epsilon"` trains a 512 base model as what it is.
    """
    keys = set(keys)
    prediction = "v_prediction" if V_PRED_MARKER in keys else None
    if any(key.startswith(SDXL_MARKER) for key in keys):
        return family_for(True, False, prediction)
    if any(key.startswith(SD2_MARKER) for key in keys):
        return family_for(False, True, prediction)
    if any(key.startswith(SD1_MARKER) for key in keys):
        return SD1
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        raise FamilyError(f"{name} is an SDXL refiner (one OpenCLIP encoder); train on an SDXL base model")
    raise FamilyError(
        f"{name} has no text-encoder keys of SD 1.x ({SD1_MARKER}…), SD 2.x ({SD2_MARKER}…) or SDXL "
        f"({SDXL_MARKER}…): it is not a Stable Diffusion checkpoint Atelier can train (a LoRA, a VAE, another model?)"
    )


def lora_family(header: Mapping[str, str]) -> ModelFamily | None:
    """The family a LoRA file's header says it was trained for (kohya's `ss_base_model_version`, or
    `modelspec.architecture`), None when it does not say: a LoRA of another family is then refused by name
    instead of failing on its first mismatched shape."""
    version = header.get("ss_base_model_version", "")
    architecture = header.get("modelspec.architecture", "").partition("/")[0]
    for family in FAMILIES.values():
        if version == family.base_model_version or architecture == family.architecture:
            return family
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return SDXL
    return None
