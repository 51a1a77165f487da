"""LoRA tools on the demo model: every check is against what diffusers itself computes.

A merged model must give the outputs of base + LoRA loaded by diffusers; a combined LoRA those of the
LoRAs loaded side by side; a converted file must load in diffusers with the same alpha. Files are made
the way training makes them (core.lora.adapters adapters with random lora_B, saved by core.lora.files).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from core.config.schema import LoraSection
from core.lora.adapters import add_training_loras
from core.lora.files import kohya_tensors, save_diffusers_lora, save_lora
from core.lora.merge import extract_lora, merge_loras
from core.lora.reading import read_lora
from core.lora.tools import combine_loras, convert_lora, inspect_lora, parse_weighted, resize_lora, run
from core.lora_tools import main
from core.models.loading import build_pipeline, load_model

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters on purpose
TOKENS = torch.tensor([[49406, 320, 1125, 3666, 49407]])
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _pipeline(model: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def _trained(model: Path, section: LoraSection, seed: int) -> StableDiffusionPipeline:
    pipe = _pipeline(model)
    add_training_loras(pipe.unet, pipe.text_encoder, section)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return pipe


@pytest.fixture(scope="module")
def loras(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`all`: every UNet layer + text encoder, rank 4, alpha 2; `attn`: attention + TE, rank 2, alpha 3;
    `diffusers`: `all`'s adapters in diffusers format (core.lora.files.save_diffusers_lora)."""
    folder = tmp_path_factory.mktemp("loras")
    meta = {"ss_sd_model_name": "demo-sd15", "ss_base_model_version": "sd_v1", "ss_epoch": "3"}
    big = _trained(demo_model, LoraSection(rank=4, alpha=2.0, targets="all", train_text_encoder=True), 7)
    small = _trained(demo_model, LoraSection(rank=2, alpha=3.0, targets="attention", train_text_encoder=True), 8)
    save_diffusers_lora(folder / "diffusers", big.unet, big.text_encoder)
    return {
        "all": save_lora(folder / "all.safetensors", big.unet, big.text_encoder, precision="fp32", metadata=meta),
        "attn": save_lora(folder / "attn.safetensors", small.unet, small.text_encoder, precision="fp32", metadata={}),
        "diffusers": folder / "diffusers" / "pytorch_lora_weights.safetensors",
    }


def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=context).sample


def _outputs(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _unet_out(unet), text_encoder(TOKENS).last_hidden_state


def _with_loras(model: Path, files: list[tuple[Path, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the base with the files loaded as diffusers adapters at these weights (the reference)."""
    pipe = _pipeline(model)
    for i, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(files))], adapter_weights=[w for _, w in files])
    return _outputs(pipe.unet, pipe.text_encoder)


def _close(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


def test_inspect_our_kohya_file(loras: dict[str, Path]) -> None:
    info = inspect_lora(loras["all"])
    assert info.format == "kohya" and info.modules == 289  # 277 UNet Linear/Conv in the blocks + 12 CLIP
    assert info.ranks == {4: 289} and info.alphas == {2.0: 289}
    assert info.targets == {
        **{"unet attention": 128, "unet feed-forward": 32, "unet conv": 95, "unet other linear": 22},
        **{"text encoder attention": 8, "text encoder MLP": 4},
    }
    assert info.base_model == "demo-sd15 (sd_v1)" and info.training["ss_epoch"] == "3"
    assert info.dtypes == ["float32"] and info.size_bytes == loras["all"].stat().st_size
    text = info.text()
    assert "kohya/A1111 LoRA, 289 modules" in text and "rank: 4 ×289" in text and "alpha: 2 ×289" in text


def test_inspect_diffusers_files_with_and_without_alpha(loras: dict[str, Path], tmp_path: Path) -> None:
    info = inspect_lora(loras["diffusers"].parent)  # the folder save_lora_weights writes
    assert info.path == loras["diffusers"]
    assert info.format == "diffusers" and info.modules == 289 and info.alphas == {2.0: 289}
    assert "lora_adapter_metadata" in info.alpha_source
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(loras["diffusers"]), bare)  # the same tensors, no header: diffusers assumes alpha = rank
    info = inspect_lora(bare)
    assert info.alphas == {4.0: 289} and "alpha = rank" in info.alpha_source and "alpha = rank" in info.text()


def test_kohya_diffusers_kohya_round_trip_is_bit_exact(loras: dict[str, Path], tmp_path: Path) -> None:
    convert_lora(loras["all"], tmp_path / "d.safetensors", to="diffusers")
    convert_lora(tmp_path / "d.safetensors", tmp_path / "k.safetensors", to="kohya")
    original, back = load_file(loras["all"]), load_file(tmp_path / "k.safetensors")
    assert back.keys() == original.keys()
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)
    assert read_lora(tmp_path / "k.safetensors").metadata["ss_epoch"] == "3"  # training metadata carried


def test_tool_made_and_converted_files_load_in_diffusers_with_their_alphas(
    loras: dict[str, Path], demo_model: Path, tmp_path: Path
) -> None:
    """Per-module ranks (energy resize) and alphas must survive in both formats.

    diffusers' kohya loader mis-scales kohya files whose alphas differ, so tool-made files carry one
    alpha; a user's varied-alpha kohya file converts to a diffusers file whose peft patterns hold them.
    """
    mixed = resize_lora(loras["all"], tmp_path / "mixed.safetensors", energy=0.8)
    modules = read_lora(mixed.output).modules.values()
    assert len({m.rank for m in modules}) > 1 and len({m.alpha for m in modules}) == 1
    convert_lora(mixed.output, tmp_path / "mixed-d.safetensors", to="diffusers")
    reference = _with_loras(demo_model, [(mixed.output, 1.0)])
    _close(_with_loras(demo_model, [(tmp_path / "mixed-d.safetensors", 1.0)]), reference)

    varied = {m.name: m.with_alpha(float(m.rank + i % 3)) for i, m in enumerate(modules)}
    save_file(kohya_tensors(varied.values()), tmp_path / "varied.safetensors")
    assert "alphas differ" in inspect_lora(tmp_path / "varied.safetensors").text()
    convert_lora(tmp_path / "varied.safetensors", tmp_path / "varied-d.safetensors", to="diffusers")
    _close(_with_loras(demo_model, [(tmp_path / "varied-d.safetensors", 1.0)]), reference)


def test_precision_change_keeps_alpha_in_float32(loras: dict[str, Path], tmp_path: Path) -> None:
    half = convert_lora(loras["all"], tmp_path / "half.safetensors", to="kohya", precision="fp16")
    tensors, original = load_file(half), load_file(loras["all"])
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert all(torch.equal(tensors[k], original[k].half()) for k in original if not k.endswith(".alpha"))
    assert tensors[f"{UNET_Q}.alpha"].dtype == torch.float32 and tensors[f"{UNET_Q}.alpha"].item() == 2.0


@pytest.mark.parametrize("suffix", [".safetensors", ""])
def test_merged_model_equals_base_plus_lora(
    suffix: str, loras: dict[str, Path], demo_model: Path, tmp_path: Path
) -> None:
    files = [(loras["all"], 0.7), (loras["attn"], -0.5)]
    output = tmp_path / f"merged{suffix}"
    result = merge_loras(str(demo_model), files, output)
    assert result.modules == {str(loras["all"]): 289, str(loras["attn"]): 136}
    merged = load_model(str(output), config_dir=demo_model)  # offline: the demo folder holds the configs
    _close(_outputs(merged.unet, merged.text_encoder), _with_loras(demo_model, files))


def test_resize_file_full_rank_lossless_lower_rank_error_is_discarded_energy(
    loras: dict[str, Path], tmp_path: Path
) -> None:
    source = read_lora(loras["all"]).modules
    full = read_lora(resize_lora(loras["all"], tmp_path / "r4.safetensors", rank=4).output).modules
    result = resize_lora(loras["all"], tmp_path / "r2.safetensors", rank=2)
    low = read_lora(result.output).modules
    assert low.keys() == source.keys() and {m.rank for m in low.values()} == {2}
    for stats in result.modules:
        delta = source[stats.name].delta().double().flatten(1)
        torch.testing.assert_close(full[stats.name].delta().double().flatten(1), delta, atol=1e-6, rtol=1e-5)
        sigma = torch.linalg.svdvals(delta)
        error = float(((low[stats.name].delta().double().flatten(1) - delta) ** 2).sum())
        assert error == pytest.approx(float((sigma[2:] ** 2).sum()), rel=1e-4, abs=1e-10)
        assert stats.energy == pytest.approx(float((sigma[:2] ** 2).sum() / (sigma**2).sum()), rel=1e-5)
    assert result.summary()[0] == "rank: 4 ×289 → 2 ×289 (289 modules)"


def test_combine_exact_reproduces_the_stacked_loras(loras: dict[str, Path], demo_model: Path, tmp_path: Path) -> None:
    files = [(loras["all"], 0.6), (loras["attn"], -0.4)]
    result = combine_loras(files, tmp_path / "combined.safetensors")
    ranks = {m.name: m.new_rank for m in result.modules}
    assert ranks[UNET_Q] == 6 and ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 4
    _close(_with_loras(demo_model, [(result.output, 1.0)]), _with_loras(demo_model, files))
    compressed = combine_loras(files, tmp_path / "c3.safetensors", rank=3, fmt="diffusers")
    stats = {m.name: m for m in compressed.modules}
    assert (stats[UNET_Q].old_rank, stats[UNET_Q].new_rank) == (6, 3) and stats[UNET_Q].energy < 1
    assert read_lora(compressed.output).format == "diffusers"


def test_extract_recovers_a_known_low_rank_delta(demo_model: Path, tmp_path: Path) -> None:
    """tuned = base + rank-3 deltas in a UNet Linear, a UNet conv and a CLIP layer, and a changed norm."""
    parts = load_model(str(demo_model))
    generator = torch.Generator().manual_seed(3)
    layers = {
        UNET_Q: parts.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_up_blocks_1_resnets_0_conv1": parts.unet.get_submodule("up_blocks.1.resnets.0.conv1"),
        TE_Q: parts.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj"),
    }
    deltas = {}
    with torch.no_grad():
        for name, layer in layers.items():
            out, inp = layer.weight.shape[0], layer.weight[0].numel()
            delta = torch.randn(out, 3, generator=generator) @ torch.randn(3, inp, generator=generator) * 0.05
            deltas[name] = delta.reshape(layer.weight.shape)
            layer.weight += deltas[name]
        parts.unet.get_submodule("mid_block.resnets.0.norm1").weight += 0.1
    build_pipeline(parts).save_pretrained(tmp_path / "tuned")
    result = extract_lora(str(demo_model), str(tmp_path / "tuned"), tmp_path / "x.safetensors", energy=0.999999)
    assert {m.name: m.new_rank for m in result.modules} == dict.fromkeys(deltas, 3)
    extracted = read_lora(result.output).modules
    for name, delta in deltas.items():
        assert extracted[name].alpha == 3.0
        torch.testing.assert_close(extracted[name].delta(), delta, atol=1e-5, rtol=1e-4)
    assert "unet.mid_block.resnets.0.norm1.weight" in result.not_extracted
    assert len(result.unchanged) == 289 - 3
    by_rank = extract_lora(str(demo_model), str(tmp_path / "tuned"), tmp_path / "x2.safetensors", rank=2)
    assert {m.new_rank for m in by_rank.modules} == {2} and all(m.energy < 1 for m in by_rank.modules)


def test_outputs_never_overwrite_inputs_and_back_up_existing_files(
    loras: dict[str, Path], demo_model: Path, tmp_path: Path
) -> None:
    before = loras["all"].read_bytes()
    with pytest.raises(ValueError, match=r"refusing to write .*input.*-o"):
        convert_lora(loras["all"], loras["all"], to="kohya")
    with pytest.raises(ValueError, match="refusing to write"):
        resize_lora(loras["all"], loras["all"].parent / "." / loras["all"].name, rank=2)
    with pytest.raises(ValueError, match="refusing to write"):
        merge_loras(str(demo_model), [(loras["all"], 1.0)], demo_model / "merged")  # inside the base folder
    assert loras["all"].read_bytes() == before
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"user data")
    convert_lora(loras["attn"], existing, to="kohya")
    assert (tmp_path / "out.safetensors.bak").read_bytes() == b"user data"
    assert read_lora(existing).modules.keys() == read_lora(loras["attn"]).modules.keys()


def test_lycoris_and_foreign_files_are_refused_clearly(loras: dict[str, Path], tmp_path: Path) -> None:
    loha = tmp_path / "loha.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    save_file({f"{module}.{n}": torch.zeros(2, 2) for n in names} | {f"{module}.alpha": torch.tensor(2.0)}, loha)
    with pytest.raises(ValueError, match=r"loha\.safetensors is a LyCORIS LoHa file .*plain LoRA only"):
        inspect_lora(loha)
    flux = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}, flux)
    with pytest.raises(ValueError, match=r"match no SD 1\.x or SDXL 1\.0 layer .*another family"):
        read_lora(flux)


def test_te1_and_ldm_names_resolve_to_our_names(loras: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_file(loras["attn"])
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # LDM naming of UNET_Q
    renamed = {k.replace("lora_te_", "lora_te1_").replace(UNET_Q, ldm): v for k, v in tensors.items()}
    del renamed[f"{ldm}.alpha"]  # kohya and A1111 then use alpha = rank
    save_file(renamed, tmp_path / "te1.safetensors")
    lora = read_lora(tmp_path / "te1.safetensors")
    assert lora.modules.keys() == read_lora(loras["attn"]).modules.keys() and lora.notes
    assert torch.equal(lora.modules[UNET_Q].down, tensors[f"{UNET_Q}.lora_down.weight"])
    assert lora.modules[UNET_Q].alpha == 2.0 and "1 modules store no alpha" in inspect_lora(lora.path).text()


def test_cli(loras: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert main(["inspect", str(loras["attn"])]) == 0
    assert "rank: 2 ×136" in caplog.text
    assert main(["resize", str(loras["all"]), "--energy", "0.9", "-o", str(tmp_path / "r.safetensors")]) == 0
    assert main(["combine", f"{loras['all']}:0.5", str(loras["attn"]), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert main(["convert", str(loras["attn"]), "--to", "diffusers", "-o", str(loras["attn"])]) == 1
    assert "refusing to write" in caplog.text
    assert parse_weighted("a.safetensors:0.5") == (Path("a.safetensors"), 0.5)
    assert parse_weighted(r"C:\loras\a.safetensors") == (Path(r"C:\loras\a.safetensors"), 1.0)


def test_reports_put_the_summary_first_and_say_what_was_backed_up(loras: dict[str, Path], tmp_path: Path) -> None:
    """Issue #14 point 9: a resize's result was buried under 289 module lines, and a second run kept a .bak silently."""
    output = tmp_path / "resized.safetensors"
    args = argparse.Namespace(command="resize", file=loras["all"], rank=2, energy=None, precision=None, output=output)
    first = run(args)
    lines = first.summary.splitlines()
    assert lines[0] == f"resized {loras['all']} ({loras['all'].stat().st_size / 1e6:.2f} MB)"
    assert lines[1] == "rank: 4 ×289 → 2 ×289 (289 modules)" and lines[2].startswith("energy kept: ")
    assert lines[3:] == [
        f"size: {output.stat().st_size / 1e6:.2f} MB",
        f"written to: {output}",
        "backed up: nothing, no file was at that path",
    ]
    assert len(first.details.splitlines()) == 289 and UNET_Q not in first.summary
    assert first.text().endswith(first.summary)  # the CLI prints the summary last, where the terminal shows it
    written = output.read_bytes()
    second = run(args)
    assert second.summary.splitlines()[-1] == "backed up: the file that was there is now resized.safetensors.bak"
    assert (tmp_path / "resized.safetensors.bak").read_bytes() == written
    out = tmp_path / "converted.safetensors"
    convert = argparse.Namespace(command="convert", file=loras["attn"], to="diffusers", precision=None, output=out)
    assert run(convert).summary.endswith("backed up: nothing, no file was at that path")
    again = run(convert)
    assert again.summary.endswith("now converted.safetensors.bak") and not again.details
