"""kill -9 of `python -m core.train` at several moments, then `--resume`: files stay whole, the curve continues.

The kill points are found from outside, by watching the run folder (a step row in metrics.jsonl, a sample
PNG appearing), except for "in the middle of a file write": that window lasts milliseconds, too short to hit
by polling, so a shim run in the child process (not in core) cuts the temporary file to half and SIGKILLs
the process just before the rename — exactly the state a kill during `torch.save` leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fault_helpers import assert_files_loadable, finish, kill_when, start_training, step_rows, temp_files

from core.config.files import build_config
from core.data.dataset import load_dataset
from core.training.preflight import plan_run
from core.training.runs import read_run

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
EPOCHS = 2


def torn_write_shim(target_suffix: str) -> str:
    """Child-process code: the first atomic write to a file ending in `target_suffix` dies half written."""
    return f"""
import os, signal
_replace = os.replace
def _torn(src, dst, *args, **kwargs):
    if str(dst).endswith({target_suffix!r}):
        os.truncate(src, os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = _torn
"""


def test_kill_at_any_moment_leaves_whole_files_and_resume_loses_at_most_one_checkpoint_interval(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    settings = [
        "run.name=demo",
        f"schedule.epochs={EPOCHS}",
        "sampling.every_n_epochs=1",
        "sampling.steps=2",
        'sampling.prompts=["a building", "a tower"]',
        "saving.every_n_epochs=1",
        "saving.checkpoint_every_n_epochs=1",
    ]
    overrides = [f"dataset.path={demo_dataset}", f"model.base={demo_model}", *settings]
    config = build_config("demo", overrides=overrides)
    plan = plan_run(config, load_dataset(config.dataset, config.run.seed))
    per_epoch = plan.steps_per_epoch  # the checkpoint interval, in steps
    run = tmp_path / "demo"
    fresh = ["--preset", "demo", "--model", str(demo_model), "--dataset", str(demo_dataset), "--output", str(tmp_path)]
    fresh += [arg for setting in settings for arg in ("--set", setting)]
    resume = ["--resume", str(run)]

    def rows_reach(step: int) -> Callable[[], bool]:
        return lambda: len(step_rows(run)) >= step

    def second_epoch_sample_exists() -> bool:
        return (run / "samples" / "epoch-0002" / "00.png").is_file()

    # (what the kill interrupts, the arguments, a shim, the moment to kill; None: the shim kills)
    kills: list[tuple[str, list[str], str, Callable[[], bool] | None]] = [
        ("a training step", fresh, "", rows_reach(per_epoch + 3)),
        ("the validation after the last step", resume, "", rows_reach(2 * per_epoch)),
        ("a LoRA file write", resume, torn_write_shim("-e0002.safetensors"), None),
        ("sampling", resume, "", second_epoch_sample_exists),
        ("a checkpoint write", resume, torn_write_shim("checkpoint.pt"), None),
    ]
    seen: dict[int, float] = {}  # every loss any killed process recorded, by step
    for what, args, shim, moment in kills:
        process = start_training(*args, shim=shim)
        if moment is None:
            code, _, err = finish(process)
            assert code == -9, f"the shim did not kill during {what} (exit {code}):\n{err[-2000:]}"
            assert temp_files(run), f"a kill during {what} should leave its half-written temporary file"
        else:
            kill_when(process, moment, what)
        checkpoint = assert_files_loadable(run)
        recorded = step_rows(run)
        seen.update({row["step"]: row["loss"] for row in recorded})
        assert checkpoint, f"no checkpoint after a kill during {what}"
        assert read_run(run).state == "killed", f"a kill during {what} is not read back as one"
        lost = max(row["step"] for row in recorded) - checkpoint["progress"]["step"]
        assert 0 <= lost <= per_epoch, f"a kill during {what} lost {lost} steps, more than one checkpoint interval"

    code, out, err = finish(start_training(*resume))
    assert code == 0, err[-2000:]
    assert f"finished: {plan.total_steps} steps, {EPOCHS} epochs" in out
    assert f"resumed at step {per_epoch}" in out + err
    final = {row["step"]: row["loss"] for row in step_rows(run)}
    assert sorted(final) == list(range(1, plan.total_steps + 1))
    assert {step: final[step] for step in seen} == seen  # every resume continued the very same curve
    assert_files_loadable(run)
    assert read_run(run).state == "finished"
    assert sorted(p.name for p in run.glob("*.safetensors")) == [
        "demo-best.safetensors",
        "demo-e0001.safetensors",
        "demo-e0002.safetensors",
        "demo.safetensors",
    ]
