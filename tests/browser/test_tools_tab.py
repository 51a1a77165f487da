"""The Tools tab runs LoRA tools in the browser: inspect a trained-format LoRA, then resize it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from core.config.schema import LoraSection
from core.lora.adapters import add_lora, unet_target_modules
from core.lora.files import save_lora
from tests.browser.conftest import screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def rank8_lora(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    unet = UNet2DConditionModel.from_pretrained(demo_model, subfolder="unet")
    add_lora(unet, unet_target_modules(unet, "attention"), LoraSection(rank=8, alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return save_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", unet, None, precision="fp32", metadata={})


def test_inspect_and_resize_a_lora_from_the_tab(page, app_server, rank8_lora: Path) -> None:
    page.get_by_role("tab", name="Tools").click()
    page.locator("#tools-inspect-file textarea, #tools-inspect-file input").first.fill(str(rank8_lora))
    page.locator("#tools-inspect-run").click()
    report = page.locator("#tools-inspect-report")
    report.get_by_text("128").first.wait_for(timeout=60_000)  # the demo UNet's 128 attention modules
    assert "8" in report.inner_text()

    page.get_by_text("Resize (lower the rank by SVD)").click()
    output = app_server.output_dir / "tools" / "rank2.safetensors"
    page.locator("#tools-resize-file textarea, #tools-resize-file input").first.fill(str(rank8_lora))
    page.locator("#tools-resize-rank input").fill("2")
    page.locator("#tools-resize-output textarea, #tools-resize-output input").first.fill(str(output))
    page.locator("#tools-resize-run").click()
    resize_report = page.locator("#tools-resize-report")
    resize_report.get_by_text("energy kept", exact=False).first.wait_for(timeout=60_000)
    with safe_open(output, "pt") as lora:
        downs = [lora.get_tensor(key) for key in lora.keys() if key.endswith("lora_down.weight")]  # noqa: SIM118
    assert downs and all(tensor.shape[0] == 2 for tensor in downs)
    _summary_first_details_folded(resize_report, output)
    assert "backed up: nothing" in resize_report.inner_text()

    page.locator("#tools-resize-rank input").fill("1")  # a second run onto the same output keeps the first as .bak
    page.locator("#tools-resize-run").click()
    resize_report.get_by_text("rank2.safetensors.bak", exact=False).wait_for(timeout=60_000)
    assert output.with_name("rank2.safetensors.bak").is_file()
    _summary_first_details_folded(resize_report, output)
    resize_report.scroll_into_view_if_needed()
    screenshot(page, "tools-tab")

    missing = rank8_lora.with_name("missing.safetensors")
    page.locator("#tools-resize-file textarea, #tools-resize-file input").first.fill(str(missing))
    page.locator("#tools-resize-run").click()
    page.locator("#tools-resize-report").get_by_text("resize failed", exact=False).wait_for(timeout=30_000)
    assert "missing.safetensors" in page.locator("#tools-resize-report").inner_text()


def _summary_first_details_folded(report, output: Path) -> None:
    """Issue #14 point 9: the summary is what shows; the 128 per-module lines stay folded until asked for."""
    text = report.inner_text()
    assert text.index("rank: 8 ×128") < text.index("energy kept") < text.index(f"written to: {output}")
    details = report.locator("details")
    assert details.count() == 1 and not details.evaluate("node => node.open")
    assert "Per-module details (128 modules" in details.locator("summary").inner_text()
    assert not report.get_by_text("attn1_to_q", exact=False).first.is_visible()
    assert report.bounding_box()["height"] < 400
