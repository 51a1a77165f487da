"""The run queue: its file (`core.training.queue`) and the runner that trains it on the app's session
(`core.training.queue_runner`), on tiny real runs of the demo model."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
from training_helpers import demo_config, read_metrics

from core.config.files import build_config, save_config
from core.training import queue
from core.training.queue import QueueBusy, QueueError, enqueue, read_queue
from core.training.queue_runner import Outcome, QueueRunner, Start, plan_start
from core.training.run_status import STATUS_FILE, RunStatus, Session
from core.training.runs import read_run
from core.training.session import SessionBusy, TrainingSession

QUICK = ("schedule.epochs=1", "sampling.every_n_epochs=0")  # 7 steps of the demo model, no samples


def labels(output: Path) -> list[str]:
    return [entry.label for entry in read_queue(output)]


def test_entries_keep_their_whole_config_order_and_state(tmp_path: Path) -> None:
    first, second = build_config("demo", overrides=["run.name=a"]), build_config("bauhaus", overrides=["run.name=b"])
    added = enqueue(tmp_path, [first, second])
    assert [(entry.label, entry.name, entry.state) for entry in added] == [("a", "a", "waiting"), ("b", "b", "waiting")]
    assert [entry.train_config() for entry in read_queue(tmp_path)] == [first, second]  # a restart needs no form
    third = enqueue(tmp_path, [build_config("demo", overrides=["run.name=c"])], label="sweep")[0]
    assert labels(tmp_path) == ["a", "b", "sweep"]

    queue.move(tmp_path, third.id, -1)
    assert labels(tmp_path) == ["a", "sweep", "b"]
    queue.move(tmp_path, third.id, -5)  # stops at the top
    assert labels(tmp_path) == ["sweep", "a", "b"]
    queue.move(tmp_path, added[0].id, +1)
    assert labels(tmp_path) == ["sweep", "b", "a"]

    assert queue.cancel(tmp_path, added[1].id).state == "cancelled"
    assert queue.next_entry(tmp_path).id == third.id
    with pytest.raises(QueueError, match=r"has ended \(cancelled\): there is nothing to cancel"):
        queue.cancel(tmp_path, added[1].id)
    queue.remove(tmp_path, added[1].id)
    assert labels(tmp_path) == ["sweep", "a"]
    with pytest.raises(QueueError, match="no queue entry 'nope' any more"):
        queue.remove(tmp_path, "nope")


def test_reading_a_folder_without_a_queue_finds_it_empty_and_makes_nothing(tmp_path: Path) -> None:
    assert read_queue(tmp_path / "none") == [] and queue.owner(tmp_path / "none") is None
    assert not (tmp_path / "none").exists()


def test_an_entry_left_running_is_taken_first_and_cannot_be_removed(tmp_path: Path) -> None:
    waiting, interrupted = enqueue(tmp_path, [build_config("demo", overrides=[f"run.name={n}"]) for n in "ab"])
    queue.update_entry(tmp_path, interrupted.id, state="running")
    assert queue.next_entry(tmp_path).id == interrupted.id
    with pytest.raises(QueueError, match="'b' is training: cancel it first"):
        queue.remove(tmp_path, interrupted.id)
    # No live process trains the queue: the interrupted entry is cancelled at once (its folder stays resumable).
    assert queue.cancel(tmp_path, interrupted.id).state == "cancelled"
    assert queue.next_entry(tmp_path).id == waiting.id


def test_a_damaged_queue_file_is_refused_by_name_and_never_replaced(tmp_path: Path) -> None:
    enqueue(tmp_path, [build_config("demo")])
    path = tmp_path / "queue.json"
    damaged = path.read_text()[:-40]  # cut short, as a disk error or a careless edit could leave it
    path.write_text(damaged)
    for operation in (
        lambda: read_queue(tmp_path),
        lambda: enqueue(tmp_path, [build_config("demo")]),
        lambda: QueueRunner(TrainingSession(), tmp_path).start(),
    ):
        with pytest.raises(QueueError, match=rf"{re.escape(str(path))} is damaged .*move it away to start an empty"):
            operation()
    assert path.read_text() == damaged
    path.write_text(json.dumps({"entries": [{"id": "x", "label": "x", "config": {}, "state": "exploded"}]}))
    with pytest.raises(QueueError, match="has no id, config or known state"):
        read_queue(tmp_path)


def test_one_process_trains_a_queue_and_a_dead_one_leaves_it_free(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = queue.Owner.me()
        alive = queue.Owner(other.pid, owner.host, psutil.Process(other.pid).create_time())
        with queue.editing(tmp_path) as queue_file:
            queue_file.owner = alive
        with pytest.raises(QueueBusy, match=f"being trained by process {other.pid}"):
            queue.claim(tmp_path)
        assert queue.owner(tmp_path) == alive
    finally:
        other.kill()
        other.wait()
    assert queue.owner(tmp_path) is None  # killed: its claim no longer counts
    queue.claim(tmp_path)
    assert queue.owner(tmp_path) == queue.Owner.me()
    queue.release(tmp_path)
    assert queue.owner(tmp_path) is None


def test_the_same_settings_waiting_are_found_so_a_rerun_adds_nothing(tmp_path: Path) -> None:
    config = build_config("demo", overrides=["run.name=a"])
    entry = enqueue(tmp_path, [config])[0]
    assert queue.waiting_alike(tmp_path, config) == entry
    assert queue.waiting_alike(tmp_path, build_config("demo", overrides=["run.name=a", "lora.rank=8"])) is None
    queue.update_entry(tmp_path, entry.id, state="done")
    assert queue.waiting_alike(tmp_path, config) is None  # trained already: queuing it again trains it again


def test_an_interrupted_entry_continues_from_its_checkpoint_or_starts_again_without_one(tmp_path: Path) -> None:
    """What a restarted queue does with the folder of an entry a kill left running (run folders written here as
    the trainer leaves them: its config, a "running" record of a process that is gone, maybe a checkpoint)."""
    config = build_config("demo", overrides=[f"run.output_dir={tmp_path}", "run.name=a"])
    entry = enqueue(tmp_path, [config])[0]
    folder = tmp_path / "a"
    save_config(config, folder / "config.toml")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = RunStatus("running", int(gone.stdout), socket.gethostname(), time.time(), "", [Session(time.time())])
    (folder / STATUS_FILE).write_text(json.dumps(asdict(status)))
    entry = queue.update_entry(tmp_path, entry.id, state="running", run_dir=str(folder))

    fresh = plan_start(entry, "1 of 1")
    assert isinstance(fresh, Start) and fresh.resume_dir is None and fresh.config == config
    assert (
        fresh.note == f"Queue entry 1 of 1, 'a': its interrupted run in {folder} had no checkpoint yet, so it "
        "starts again in a new folder"
    )
    (folder / "checkpoint.pt").write_bytes(b"")  # only its presence matters here; the trainer reads it
    resumed = plan_start(entry, "1 of 1")
    assert isinstance(resumed, Start) and resumed.resume_dir == folder and resumed.config == config
    assert "continuing its interrupted run" in resumed.note
    (folder / STATUS_FILE).write_text(json.dumps(asdict(replace(status, state="finished"))))
    assert plan_start(entry, "1 of 1") == Outcome("done")  # killed after the run ended, before the queue knew


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_the_runner_trains_entries_in_order_on_the_session_and_records_their_folders(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    session = TrainingSession()
    configs = [demo_config(demo_model, demo_dataset, tmp_path, *QUICK, f"run.name={name}") for name in ("a", "b")]
    broken = demo_config(demo_model, demo_dataset, tmp_path, *QUICK, "run.name=c", f"dataset.path={tmp_path}/none")
    enqueue(tmp_path, [configs[0], broken, configs[1]])
    runner = QueueRunner(session, tmp_path)
    assert runner.start() and not runner.start()  # a second start while it trains does nothing
    with pytest.raises(SessionBusy, match=r"The queue is training its runs .*add this run to the queue"):
        runner.refuse_while_training()  # what Start and Resume by hand say meanwhile
    assert runner.wait(300) and runner.problem == ""
    first, failed, second = read_queue(tmp_path)
    assert (first.state, failed.state, second.state) == ("done", "failed", "done")
    assert "dataset.path" in failed.error and not failed.run_dir
    assert [Path(entry.run_dir) for entry in (first, second)] == [(tmp_path / n).resolve() for n in ("a", "b")]
    assert read_run(Path(second.run_dir)).state == "finished"
    snapshot = session.snapshot()  # the Monitor shows the last one, and its log says which entry it was
    assert snapshot.run_dir == str(tmp_path / "b") and snapshot.log[0] == "Queue entry 3 of 3, 'b': a new run"
    assert queue.owner(tmp_path) is None
    runner.refuse_while_training()  # the queue is done: runs by hand are welcome again


@pytest.mark.slow
def test_cancel_stops_the_running_entry_and_the_queue_goes_on_while_a_stop_pauses_it(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    session = TrainingSession()
    long = demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=20", "sampling.every_n_epochs=0")
    quick = [demo_config(demo_model, demo_dataset, tmp_path, *QUICK, f"run.name={name}") for name in ("b", "c")]
    cancelled = enqueue(tmp_path, [long, *quick])[0]
    runner = QueueRunner(session, tmp_path)
    runner.start()
    wait_for(lambda: session.snapshot().step >= 2, "the first entry's second step")
    assert runner.cancel(cancelled.id).cancel_requested
    wait_for(lambda: session.snapshot().run == 2 and session.snapshot().step >= 1, "the next entry")
    session.stop()  # the Monitor's Stop: this run stops and the queue waits
    assert runner.wait(300)
    states = [(entry.state, entry.error) for entry in read_queue(tmp_path)]
    assert states == [("cancelled", ""), ("stopped", ""), ("waiting", "")]
    assert read_run(tmp_path / "demo").state == "stopped" and read_run(tmp_path / "demo").checkpoint
    runner.start()  # Start queue goes on with the next waiting entry
    assert runner.wait(300)
    assert [entry.state for entry in read_queue(tmp_path)] == ["cancelled", "stopped", "done"]
    assert max(row["step"] for row in read_metrics(tmp_path / "c") if row["type"] == "step") == 7


@pytest.mark.slow
def test_a_run_started_by_hand_goes_first_and_cancel_leaves_it_alone(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    session = TrainingSession()
    session.start(demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=2", "sampling.every_n_epochs=0"))
    waiting = enqueue(tmp_path, [demo_config(demo_model, demo_dataset, tmp_path, *QUICK, "run.name=q")])[0]
    runner = QueueRunner(session, tmp_path)
    runner.start()
    wait_for(lambda: queue.read_queue(tmp_path)[0].state == "running", "the entry to be taken")
    runner.cancel(waiting.id)  # the entry waits for the hand-started run: that run must go on
    assert runner.wait(300) and session.wait(300)
    assert read_queue(tmp_path)[0].state == "cancelled" and not read_queue(tmp_path)[0].run_dir
    assert session.snapshot().status == "finished" and session.snapshot().run == 1
