"""The Inference tab's pure functions: widget values → request, brush strokes → mask, run folders → LoRA
choices, "parameters" text → widget values, and the "use this epoch" hook.

No model is loaded: these are the rules the browser test relies on, checked fast and exhaustively.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from core.common.workspace import Workspace
from core.config.files import build_config
from core.inference.a1111_params import generation_parameters, request_from_parameters, restore_parameters
from core.inference.engine import InferenceEngine
from core.inference.requests import ControlSpec, GenerationError, GenerationRequest, LoraSpec
from core.lora.header import short_hash
from ui.config_store import ConfigStore
from ui.inference_form import (
    MAX_LORAS,
    SWEEP_KINDS,
    FormValues,
    UnitValues,
    combined_mask,
    default_models,
    discover_loras,
    discover_runs,
    fit_to_photo,
    mask_from_editor,
    mask_overlay,
    parse_weights,
    photo_from_editor,
    place_lora,
    request_from_form,
    restore_form,
    sweep_inputs_shown,
    sweep_variants,
    visible_rows,
)
from ui.inference_tab import build_inference_tab, lora_updates

SCALARS: dict[str, Any] = {
    "prompt": "bauhaus style building",
    "negative_prompt": "blurry",
    "seed": 42.0,  # what gr.Number and gr.Slider hand over: floats
    "steps": 3.0,
    "cfg_scale": 6,
    "width": 64.0,
    "height": 64.0,
    "batch_count": 2.0,
    "sampler": "euler_a",
    "mode": "inpaint",
    "strength": 0.8,
    "mask_feather": 4.0,
    "mask_grow": -2.0,
    "only_masked": True,
    "mask_padding": 16.0,
}


def photo() -> Image.Image:
    image = Image.new("RGBA", (120, 90), (180, 205, 230, 255))
    ImageDraw.Draw(image).rectangle((20, 30, 100, 80), fill=(235, 232, 224, 255))
    return image


def strokes(box: tuple[int, int, int, int], size: tuple[int, int] = (120, 90), alpha: int = 140) -> Image.Image:
    """A brush layer as the editor returns it: RGBA, transparent except the translucent stroke."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle(box, fill=(255, 45, 111, alpha))
    return layer


def editor(*layers: Image.Image) -> dict[str, Any]:
    background = photo()
    return {"background": background, "layers": list(layers), "composite": background}


def form(**changes: Any) -> FormValues:
    fields: dict[str, Any] = {
        "scalars": SCALARS,
        "editor": editor(strokes((40, 40, 70, 60))),
        "loras": [("/runs/a/a-e0002.safetensors", 0.7), (None, 1.0), ("  ", 1.0)],
        "units": [
            UnitValues("lineart", True, "/demo/controlnet-lineart", 0.9, 0.0, 0.8),
            UnitValues("depth", False, "/demo/controlnet-depth"),
            UnitValues("canny", True, "", 1.0, 0.1, 1.0, image=Image.new("RGB", (8, 8))),
        ],
    }
    return FormValues(**{**fields, **changes})


# ----- widget values → request -------------------------------------------------------------------


def test_the_form_becomes_a_typed_request() -> None:
    request = request_from_form(form())
    assert (request.seed, request.steps, request.width, request.batch_count) == (42, 3, 64, 2)
    assert all(isinstance(v, int) for v in (request.seed, request.steps, request.width, request.mask_padding))
    assert (request.cfg_scale, request.sampler, request.mode, request.strength) == (6.0, "euler_a", "inpaint", 0.8)
    assert (request.mask_feather, request.mask_grow, request.only_masked) == (4, -2, True)
    assert request.init_image is not None and request.init_image.mode == "RGB" and request.init_image.size == (120, 90)
    assert request.mask_image is not None and request.mask_image.getbbox() == (40, 40, 71, 61)
    assert request.loras == (LoraSpec("/runs/a/a-e0002.safetensors", 0.7),)  # empty rows are left out
    assert [(unit.kind, unit.model, unit.end) for unit in request.controls] == [
        ("lineart", "/demo/controlnet-lineart", 0.8),
        ("canny", "", 1.0),
    ]
    assert request.controls[0].image is None and request.controls[1].image is not None


def test_mask_settings_do_not_block_other_modes_and_an_empty_seed_is_random() -> None:
    request = request_from_form(form(scalars={**SCALARS, "mode": "img2img", "seed": None}))
    assert request.mode == "img2img" and request.mask_image is None and not request.only_masked
    assert request.seed == -1


def test_every_problem_is_reported_at_once_with_the_field_and_the_fix() -> None:
    bad = {**SCALARS, "width": 70, "steps": None}
    with pytest.raises(GenerationError) as error:
        request_from_form(form(scalars=bad, editor=None))
    message = str(error.value)
    assert "Mode inpaint starts from a photo: upload one under Photo" in message
    assert "ControlNet lineart has nothing to follow" in message
    assert "ControlNet canny" not in message  # it has its own control image
    assert "Steps is empty" in message and "width 70 is not a multiple of 8" in message
    with pytest.raises(GenerationError, match="Inpaint needs a mask: paint the area to redraw"):
        request_from_form(form(editor=editor()))


# ----- the editor's value → photo and mask -------------------------------------------------------


def test_the_mask_is_every_painted_pixel_of_every_layer_at_the_photos_size() -> None:
    value = editor(strokes((10, 10, 19, 19), alpha=1), strokes((0, 0, 29, 14), size=(60, 45)))
    mask = mask_from_editor(value)
    assert mask is not None and mask.mode == "L" and mask.size == (120, 90)
    pixels = np.asarray(mask)
    assert set(np.unique(pixels)) == {0, 255}
    assert pixels[15, 15] == 255  # alpha 1 still counts: any paint is mask
    assert pixels[:30, :60].min() == 255 and pixels[29, 60] == 0  # the half-size layer, scaled up
    assert mask_from_editor(editor()) is None and mask_from_editor(editor(strokes((0, 0, 5, 5), alpha=0))) is None
    assert mask_from_editor(None) is None and photo_from_editor({"background": None, "layers": []}) is None


def test_an_uploaded_mask_adds_to_the_brush_strokes() -> None:
    upload = Image.new("L", (240, 180), 0)
    ImageDraw.Draw(upload).rectangle((200, 140, 239, 179), fill=255)  # bottom-right, at twice the size
    mask = combined_mask(editor(strokes((0, 0, 9, 9))), upload)
    assert mask is not None
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((110, 80)) == 255 and mask.getpixel((60, 45)) == 0
    only_upload = combined_mask(editor(), upload)
    assert only_upload is not None and only_upload.getbbox() == (100, 70, 120, 90)
    assert combined_mask(editor(), Image.new("L", (8, 8), 0)) is None


# ----- LoRA files and runs -----------------------------------------------------------------------


def make_runs(output: Path) -> None:
    """Two runs, a feature cache and stray files; only the "-best" file is read (for its epoch), so only it is real."""
    for name in ("demo/demo-e0010.safetensors", "demo/demo-e0002.safetensors"):
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(output / "demo" / "demo-best.safetensors"), metadata={"ss_epoch": "10"})
    (output / "bauhaus").mkdir()
    (output / "bauhaus" / "bauhaus.safetensors").write_bytes(b"")
    (output / "cache" / "latents").mkdir(parents=True)
    (output / "cache" / "latents" / "0a1b.safetensors").write_bytes(b"")  # encoded features, not LoRAs
    (output / "stray.safetensors").write_bytes(b"")
    (output / "atelier-ui.toml").write_text("")


def test_the_runs_loras_are_offered_run_by_run_epochs_in_order(tmp_path: Path) -> None:
    make_runs(tmp_path)
    assert discover_loras(tmp_path) == [
        ("bauhaus / bauhaus", str(tmp_path / "bauhaus" / "bauhaus.safetensors")),
        ("demo / demo-e0002", str(tmp_path / "demo" / "demo-e0002.safetensors")),
        ("demo / demo-e0010", str(tmp_path / "demo" / "demo-e0010.safetensors")),
        ("demo / demo-best", str(tmp_path / "demo" / "demo-best.safetensors")),
    ]
    assert discover_runs(tmp_path) == [("demo (2 epochs)", str(tmp_path / "demo"))]
    assert discover_loras(tmp_path / "missing") == [] and discover_runs(tmp_path / "missing") == []


def test_use_this_epoch_swaps_the_runs_epoch_or_fills_the_first_empty_row() -> None:
    rows = [("/out/demo/demo-e0002.safetensors", 0.6), ("/out/other/x.safetensors", 1.0)]
    swapped = place_lora(rows, "/out/demo/demo-e0004.safetensors")
    assert swapped[:2] == [("/out/demo/demo-e0004.safetensors", 0.6), rows[1]] and len(swapped) == MAX_LORAS
    added = place_lora(rows, "/out/third/t.safetensors")
    assert added[2] == ("/out/third/t.safetensors", 1.0)
    assert place_lora(rows, rows[1][0])[:2] == rows  # already there
    full = [(f"/out/r{i}/f.safetensors", 1.0) for i in range(MAX_LORAS)]
    assert place_lora(full, "/out/new/n.safetensors")[-1] == ("/out/new/n.safetensors", 1.0)
    assert visible_rows(["a", None, None, None]) == [True, True, False, False]
    assert visible_rows([None, "b", None, None]) == [True, True, True, False]


def test_the_use_lora_hook_fills_the_rows_of_a_built_tab(tmp_path: Path) -> None:
    config = build_config(["sd15"], overrides=[f"run.output_dir={tmp_path}"])
    context = SimpleNamespace(
        output_dir=tmp_path,
        store=ConfigStore(tmp_path / "ui.toml", config),
        engine=InferenceEngine(),
        workspace=Workspace.create(tmp_path),
        demo_model=None,
    )
    with gr.Blocks() as app:
        chosen = gr.State(None)
        with gr.Tab("Inference") as tab:
            inference = build_inference_tab(context, app, tab)  # type: ignore[arg-type]
        trigger = gr.Button().click(lambda: "/out/demo/demo-e0004.safetensors", outputs=chosen)
        hook = inference.use_lora(trigger, chosen)
    put = hook.fn
    values = put("/out/demo/demo-e0004.safetensors", "/out/demo/demo-e0002.safetensors", None, None, None, 0.5, 1, 1, 1)
    assert values[:MAX_LORAS] == ["/out/demo/demo-e0004.safetensors", None, None, None]
    assert values[MAX_LORAS] == 0.5
    assert [update["visible"] for update in values[2 * MAX_LORAS :]] == [True, True, False, False]
    assert all(value is gr.skip() or value == gr.skip() for value in put(None, *[None] * 4, *[1] * 4))


# ----- sweeps ------------------------------------------------------------------------------------


def test_sweep_variants_for_files_epochs_and_weights(tmp_path: Path) -> None:
    make_runs(tmp_path)
    files = [str(tmp_path / "demo" / "demo-e0002.safetensors"), str(tmp_path / "bauhaus" / "bauhaus.safetensors")]
    variants = sweep_variants(SWEEP_KINDS[0], files, None, "", 0.8, [])
    assert [v.label for v in variants] == ["demo-e0002", "bauhaus"] and variants[0].loras[0].weight == 0.8
    epochs = sweep_variants(SWEEP_KINDS[1], [], str(tmp_path / "demo"), "", 1.0, [])
    assert [v.label for v in epochs] == ["epoch 2", "epoch 10", "best (epoch 10)"]
    weights = sweep_variants(SWEEP_KINDS[2], [], None, "0, 0.5 1", 1.0, [(None, 1.0), (files[1], 0.3)])
    assert [v.label for v in weights] == ["bauhaus 0", "bauhaus 0.5", "bauhaus 1"]
    for kind, message in zip(SWEEP_KINDS, ("pick at least one file", "pick a run", "first LoRA row"), strict=True):
        with pytest.raises(GenerationError, match=message):
            sweep_variants(kind, [], None, "1", 1.0, [])
    (tmp_path / "demo" / "demo-best.safetensors").write_bytes(b"broken")
    with pytest.raises(GenerationError, match=r"Sweep over epochs: cannot read .*demo-best.safetensors"):
        sweep_variants(SWEEP_KINDS[1], [], str(tmp_path / "demo"), "", 1.0, [])
    assert [sweep_inputs_shown(kind) for kind in SWEEP_KINDS] == [
        (True, False, False, True),
        (False, True, False, True),
        (False, False, True, False),
    ]
    assert parse_weights("0,0.25, 1") == [0.0, 0.25, 1.0]
    with pytest.raises(GenerationError, match="write numbers separated by commas"):
        parse_weights("0, half")
    with pytest.raises(GenerationError, match="at least one number"):
        parse_weights(" , ")


# ----- "parameters" text → widget values ---------------------------------------------------------


def test_parameters_restore_the_scalars_the_lora_rows_and_the_units(tmp_path: Path) -> None:
    make_runs(tmp_path)
    demo = tmp_path / "demo-model"
    (demo / "controlnet-depth").mkdir(parents=True)
    lora = tmp_path / "demo" / "demo-e0002.safetensors"
    request = GenerationRequest(
        "bauhaus style building",
        "blurry",
        seed=7,
        steps=3,
        cfg_scale=5.5,
        width=64,
        height=96,
        sampler="unipc",
        mode="inpaint",
        strength=0.6,
        mask_feather=3,
        mask_grow=2,
        only_masked=True,
        mask_padding=24,
        loras=(LoraSpec(str(lora), 0.7),),
        controls=(
            ControlSpec("depth", str(demo / "controlnet-depth"), weight=0.5, start=0.1, end=0.9),
            ControlSpec("lineart"),  # the standard hub model
        ),
    )
    text = generation_parameters(request, seed=7, model="sd15", lora_hashes=[short_hash(lora)])
    fields = request_from_parameters(text, lora_dirs=[tmp_path], controlnet_dirs=[demo])
    restored = restore_form(fields, default_models(demo))
    assert restored.scalars == {**{k: getattr(request, k) for k in SCALARS if k != "batch_count"}}
    assert restored.loras == [(str(lora), 0.7), (None, 1.0), (None, 1.0), (None, 1.0)]
    assert restored.units is not None
    assert restored.units["depth"] == UnitValues("depth", True, str(demo / "controlnet-depth"), 0.5, 0.1, 0.9)
    assert restored.units["lineart"] == UnitValues("lineart", True, "", 1.0, 0.0, 1.0)
    assert restored.units["canny"] == UnitValues("canny", False, str(demo / "controlnet-lineart"))

    bare = restore_form(request_from_parameters("just a prompt"), default_models(None))
    assert bare.scalars == {"prompt": "just a prompt", "negative_prompt": ""} and bare.loras is None
    a1111 = "a house\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    a1111 += ', ControlNet 0: "Module: lineart_realistic, Model: control_v11p_sd15_lineart [43d4be0d], Weight: 1"'
    restored = restore_form(request_from_parameters(a1111), default_models(None))
    assert restored.scalars["sampler"] == "dpmpp_2m_karras" and restored.loras == [(None, 1.0)] * MAX_LORAS
    assert restored.units is not None and restored.units["lineart"].enabled and restored.units["lineart"].model == ""
    rows = lora_updates(restored.loras)
    assert rows[:MAX_LORAS] == [None] * MAX_LORAS and rows[2 * MAX_LORAS]["visible"] is True


def tiny_lora(path: Path, seed: int) -> Path:
    """A one-module kohya LoRA; the seed makes its tensors, and so its hash, its own."""
    generator = torch.Generator().manual_seed(seed)
    module = "lora_unet_mid_block_attentions_0_proj_in"
    tensors = {
        f"{module}.lora_down.weight": torch.randn(2, 8, generator=generator),
        f"{module}.lora_up.weight": torch.randn(8, 2, generator=generator),
        f"{module}.alpha": torch.tensor(2.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_a_dropped_png_restores_its_loras_by_hash_never_a_namesake(tmp_path: Path) -> None:
    """Issue #14: `bauhaus-2/bauhaus-best` came back as `bauhaus/bauhaus-best`, the lookup went by name."""
    output, models = tmp_path / "output", tmp_path / "models"
    first = tiny_lora(output / "bauhaus" / "bauhaus-best.safetensors", 0)
    second = tiny_lora(output / "bauhaus-2" / "bauhaus-best.safetensors", 1)
    renamed = tiny_lora(models / "styles" / "glass.safetensors", 2)
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(models / "checkpoint.safetensors"))  # not hashed
    folders = [output, models]
    stack = (LoraSpec(str(second), 0.8), LoraSpec(str(first), 0.5))
    text = generation_parameters(
        GenerationRequest("p", loras=stack), seed=1, model="sd15", lora_hashes=[short_hash(second), short_hash(first)]
    )
    found = restore_parameters(text, lora_dirs=folders)
    assert found.fields["loras"] == stack and [m.problem for m in found.loras] == ["", ""]

    moved = generation_parameters(
        GenerationRequest("p", loras=(LoraSpec("old/name.safetensors", 1.0),)),
        seed=1,
        model="sd15",
        lora_hashes=[short_hash(renamed)],
    )
    assert request_from_parameters(moved, lora_dirs=folders)["loras"] == (LoraSpec(str(renamed), 1.0),)

    unknown = generation_parameters(
        GenerationRequest("p", loras=stack), seed=1, model="sd15", lora_hashes=["fd3d0a4788b0", short_hash(first)]
    )
    found = restore_parameters(unknown, lora_dirs=folders)
    assert found.fields["loras"] == (LoraSpec("bauhaus-best", 0.8), LoraSpec(str(first), 0.5))
    problem = found.loras[0].problem
    assert "fd3d0a4788b0" in problem and str(first) in problem and str(second) in problem and "Pick the file" in problem
    assert restore_form(found.fields, default_models(None), found.loras).lora_notes == [problem, "", "", ""]

    # No hash (A1111 without "Lora hashes"): one namesake is used, several or none are named; a name is never a path.
    bare = "<lora:glass:1> <lora:bauhaus-best:1> <lora:../output/bauhaus/bauhaus-best:1> <lora:*:1>"
    bare += "\nSteps: 2, Seed: 1, Size: 64x64"
    matches = restore_parameters(bare, lora_dirs=folders).loras
    assert [m.path for m in matches] == [renamed, None, None, None]
    assert str(first) in matches[1].problem and "no LoRA file named *" in matches[3].problem
    control = 'p\nSteps: 2, Seed: 1, ControlNet 0: "Module: depth, Model: ../models/styles, Weight: 1"'
    assert request_from_parameters(control, controlnet_dirs=[output])["controls"][0].model == "../models/styles"
    wildcard = 'p\nSteps: 2, Seed: 1, ControlNet 0: "Module: depth, Model: glas*, Weight: 1"'
    assert request_from_parameters(wildcard, controlnet_dirs=[models])["controls"][0].model == "glas*"


# ----- sizes and the mask preview ----------------------------------------------------------------


def test_the_size_follows_the_photos_aspect_without_shrinking() -> None:
    assert fit_to_photo((4000, 3000), 512, 512) == (592, 440)  # a big photo: about the current pixel count
    assert fit_to_photo((3000, 4000), 768, 768) == (664, 888)
    assert fit_to_photo((10000, 100), 512, 512) == (2048, 64)
    # Issue #14: the demo's 128 x 128 turned a 512 x 384 photo into 144 x 112; a photo up to SD 1.5's
    # 512 x 512 keeps its own size, a larger one gets at least that many pixels.
    assert fit_to_photo((512, 384), 128, 128) == (512, 384)
    assert fit_to_photo((4000, 3000), 128, 128) == (592, 440)
    assert fit_to_photo((90, 90), 64, 64) == (88, 88)  # rounded to a multiple of 8
    assert fit_to_photo((512, 384), 1024, 1024) == (1184, 888)  # never below the current pixel count


def test_the_mask_preview_darkens_what_stays_and_outlines_the_rendered_box() -> None:
    image = photo().convert("RGB")
    soft = Image.new("L", image.size, 0)
    ImageDraw.Draw(soft).rectangle((40, 40, 70, 60), fill=255)
    whole = mask_overlay(image, soft, (0, 0, *image.size))
    assert whole.getpixel((50, 50)) == image.getpixel((50, 50))
    assert sum(whole.getpixel((5, 5))) < sum(image.getpixel((5, 5))) / 2
    boxed = mask_overlay(image, soft, (30, 30, 90, 70))
    assert boxed.getpixel((30, 50)) == (255, 204, 0) and whole.getpixel((30, 50)) != (255, 204, 0)
