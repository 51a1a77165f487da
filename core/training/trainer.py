"""The LoRA training run: load, cache, then the loop, read top to bottom like the diffusers example.

One `Trainer` is one run. It reports through `TrainingCallbacks`, obeys `TrainingCommands` at step
boundaries, and writes everything into its run folder (config, metrics, TensorBoard, samples, LoRA
files, checkpoint). Under `accelerate launch` each process trains on its share of the batches and
validates on the whole validation set (the same weights give every rank the same loss, so all stop
early together); only the main process writes files: samples, LoRA files, checkpoints, the run log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

from core.common.fsutil import remove_leftovers
from core.config.files import save_config
from core.config.schema import ConfigError, TrainConfig
from core.models.loading import ModelComponents
from core.training.batches import BatchOrder, FeatureOptions, TrainingSet, cache_run_features
from core.training.checkpoint import ResumableState, load_checkpoint, save_checkpoint
from core.training.conditioning import TextEncoders
from core.training.errors import explain_error, nonfinite_loss_error
from core.training.events import StepRecord, TrainingCallbacks, TrainingCommands, ValidationRecord
from core.training.lora_saver import LoraSaver
from core.training.loss_readback import LossReadback
from core.training.losses import batch_loss
from core.training.model_setup import load_for_training
from core.training.optim import make_lr_scheduler, make_optimizer, step_unless_nonfinite
from core.training.preflight import RunPlan, device_problems, plan_run, preflight
from core.training.run_log import RunLog, replay
from core.training.run_state import Progress, RunResult, new_run_dir
from core.training.run_status import mark_started, record_end
from core.training.samples import render_samples
from core.training.text_log import LoggedCallbacks, TextLog
from core.training.validation import ValidationSet, validation_loss

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        callbacks: TrainingCallbacks | None = None,
        commands: TrainingCommands | None = None,
        resume_dir: Path | None = None,
        note: str = "",
    ) -> None:
        """`note` opens the run's log file (the queue names the entry there)."""
        self.config = config
        self.callbacks = callbacks or TrainingCallbacks()
        self.commands = commands or TrainingCommands()
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.text_log: TextLog | None = None
        self.note = note

    # ----- setup ---------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        log.info(message)
        self.callbacks.on_log(message)

    def _check(self) -> RunPlan:
        dataset, problems = preflight(self.config)
        problems += device_problems(self.config, self.accelerator.device.type)
        if problems:
            raise ConfigError(problems)
        self.dataset = dataset
        return plan_run(self.config, dataset, self.accelerator.num_processes)

    def _cache_features(self, components: ModelComponents) -> tuple[TrainingSet, ValidationSet | None]:
        self.callbacks.on_status("caching")
        cfg, dtype = self.config, self.weight_dtype
        options = FeatureOptions.for_run(cfg, self.accelerator.device, dtype, bool(self.text_params))
        features, stats = cache_run_features(cfg, self.dataset, components, options)
        self._say(f"features: {stats.reused} reused from the cache, {stats.encoded} encoded")
        if not cfg.performance.cache_latents:
            self._say("latents are not cached (performance.cache_latents = false): images are encoded at every step")
        return features

    # ----- the run -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """One run, top to bottom: setup, the epoch loop, the final save.

        Setup is split so a bad config or a damaged checkpoint stops before the model loads. The run log
        is closed on every exit, an error included, so the folder's history is whole for a later resume, and
        the folder's status record says how the run ended (a kill leaves it "running": see `run_status`).
        """
        state = self._open_run()
        try:
            self._load_model()
            progress = self._start_position(state)
            self.callbacks.on_status("training")
            try:
                status = self._train(progress)
                self._finish(progress, status)
            finally:
                if self.run_log:
                    self.run_log.close()
        except Exception as error:
            self._record_end("failed", error)
            raise
        self._record_end(status)
        self.callbacks.on_status(status)
        files, epoch = self.loras.files if self.loras else [], min(progress.epoch, self.plan.epochs)
        return RunResult(self.run_dir, status, progress.step, epoch, progress.best_epoch, progress.best_val_loss, files)

    def _open_run(self) -> dict | None:
        """Check the config, read the checkpoint and fix the run folder, all before anything heavy loads.

        Returns the checkpoint to resume from, if any. Every process writes under the folder the main one
        chose, so a fresh run's `<name>-2` is never picked twice.
        """
        cfg = self.config
        # The app runs many trainings in one process, but accelerate keeps its precision setting in a
        # process-wide singleton; reset that part (not the distributed state) so each run gets its own.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=cfg.performance.mixed_precision)
        self.weight_dtype = WEIGHT_DTYPES[cfg.performance.mixed_precision]
        self.plan = plan = self._check()
        state = load_checkpoint(self.resume_dir) if self.resume_dir else None
        chosen = [str(self.resume_dir or new_run_dir(Path(cfg.run.output_dir), cfg.run.name))]
        self.run_dir = Path(broadcast_object_list(chosen)[0])  # every process agrees on the main one's folder
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.run_dir)  # half-written files and folders of a killed earlier process
            save_config(cfg, self.run_dir / "config.toml")
            mark_started(self.run_dir)
            self.text_log = TextLog(self.run_dir, resumed=state is not None, note=self.note)
            self.callbacks = LoggedCallbacks(self.callbacks, self.text_log)
        self.callbacks.on_run_dir(self.run_dir, resumed=state is not None)
        self._say(
            f"{plan.train_images} training and {plan.validation_images} validation images, "
            f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in {plan.epochs} epochs"
        )
        return state

    def _load_model(self) -> None:
        """Load the model with its adapters, cache the features, and wrap what trains for accelerate.

        Two views of the UNet are kept because they differ: `self.unet` is what the training forward runs
        (wrapped, maybe compiled), `self.lora_unet` the plain module that LoRA files, checkpoints,
        validation and samples read.
        """
        cfg = self.config
        self.callbacks.on_status("loading")
        components, self.unet_params, self.text_params = load_for_training(
            cfg, self.accelerator.device, self.weight_dtype
        )
        self.train_set, self.validation = self._cache_features(components)
        optimizer = make_optimizer(cfg.optimizer, self.unet_params, self.text_params)
        self.lr_scheduler = make_lr_scheduler(cfg.schedule, optimizer, self.plan.total_steps)
        self.unet, self.optimizer = self.accelerator.prepare(components.unet, optimizer)
        if cfg.performance.compile:  # the training forward only: validation and samples run the plain module
            self.unet = torch.compile(self.unet)
        trained = (
            [self.accelerator.prepare(encoder) for encoder in components.text_encoders] if self.text_params else []
        )
        self.text = TextEncoders(components.tokenizers, trained or components.text_encoders)  # what the step runs
        self.lora_unet = self.accelerator.unwrap_model(components.unet)
        self.lora_text_encoders = components.text_encoders if self.text_params else []
        self.components = components

    def _start_position(self, state: dict | None) -> Progress:
        """Seed this process's batch order and noise, then move them, the weights and the history to `state`.

        Each rank gets its own seeds so the ranks draw different noise. Only the main process writes files,
        so only it gets a run log and a LoRA saver; every process replays the history to its callbacks.
        """
        cfg, rank = self.config, self.accelerator.process_index
        self.order = BatchOrder(cfg.run.seed + rank)
        self.noise = torch.Generator(self.accelerator.device).manual_seed(cfg.run.seed + 10_000 + rank)
        self.resumable = ResumableState(
            self.lora_unet, self.lora_text_encoders, self.optimizer, self.lr_scheduler, self.order, self.noise
        )
        progress, history = self.resumable.restore(state) if state is not None else (Progress(), [])
        if state is not None:
            self._say(f"resumed at step {progress.step}, epoch {progress.epoch}")
        main = self.accelerator.is_main_process
        self.run_log = RunLog(self.run_dir, history) if main else None
        self.loras = (
            LoraSaver(
                cfg, self.run_dir, self.plan.train_images, self.components, bool(self.text_params), self.callbacks
            )
            if main
            else None
        )
        replay(history, self.callbacks)
        return progress

    def _train(self, progress: Progress) -> str:
        """The epoch loop, from wherever `progress` stands; returns how the run ended.

        Every loss is read back before an epoch end or a stop, because the epoch record, the checkpoint and
        the final LoRA must account for each step taken.
        """
        self.started, self.step_times = time.perf_counter(), []
        self.losses = LossReadback(self.config.performance.loss_readback_seconds)
        while progress.epoch <= self.plan.epochs and progress.step < self.plan.total_steps:
            ended = self._train_epoch(progress)
            self._read_losses(progress)  # the epoch end, a stop and the final save need every loss
            if ended:
                return ended
            progress.next_batch = 0
            if self._end_of_epoch(progress):
                return "early_stopped"
            progress.epoch += 1
        return "finished"

    def _train_epoch(self, progress: Progress) -> str | None:
        """The step loop over this process's batches of one epoch, from `progress.next_batch` on a resume.

        Returns "stopped" or "early_stopped" when the run ends inside the epoch, None when its batches or
        the run's steps ran out. Commands are obeyed only between steps, so a manual save or a stop always
        lands on a step boundary that a resume can continue from.
        """
        if progress.next_batch == 0:
            progress.epoch_losses = []
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        batches = self.order.epoch_batches(self.train_set, world, rank, mid_epoch=progress.next_batch > 0)
        accumulation, every = self.config.schedule.gradient_accumulation, self.config.validation.every_n_steps
        while progress.next_batch < len(batches) and progress.step < self.plan.total_steps:
            if self._obey_commands(progress):
                if progress.next_batch == 0:
                    self.order.undraw()  # stopped before the epoch's first step: its checkpoint starts the epoch
                return "stopped"
            self._train_step(progress, batches[progress.next_batch : progress.next_batch + accumulation])
            validate = self.validation is not None and every > 0 and progress.step % every == 0
            if validate or self.losses.due():
                self._read_losses(progress)  # a validation is reported after every step before it
            if validate:
                self._validate_and_track(progress)
                if self._patience_exhausted(progress):
                    return "early_stopped"
        return None

    def _train_step(self, progress: Progress, group: list[list[int]]) -> None:
        """One timed optimizer step over `group`; its loss is queued on the device, not read back.

        Reading the loss at every step would make the CPU wait for the GPU each time; `_read_losses`
        reports the queued steps when a validation, a command or an epoch end needs them, or when due.
        """
        tick = time.perf_counter()
        loss = self._optimizer_step(group)
        progress.next_batch += len(group)
        progress.step += 1
        self.step_times = [*self.step_times[-19:], time.perf_counter() - tick]  # the speed of the last 20 steps
        self.losses.add(self._step_record(progress, self.step_times, self.started), loss)

    def _optimizer_step(self, group: list[list[int]]) -> torch.Tensor:
        """Forward and backward over `group` (one batch per accumulation micro-step), then one optimizer step;
        returns the loss, averaged over processes, still on the device.

        A step whose loss is not finite is left out (`step_unless_nonfinite`). Every process sees the same
        reduced loss, so all leave it out together. The learning-rate schedule advances either way: it follows
        the step number, which a skipped step keeps.
        """
        cfg, device, dtype = self.config, self.accelerator.device, self.weight_dtype
        scheduler = self.components.noise_scheduler
        total = torch.zeros((), device=device)
        for index, indices in enumerate(group):
            batch = self.train_set.batch(indices, self.order.generator, self.noise, cfg.dataset.flip)
            last = index == len(group) - 1
            sync = self.accelerator.no_sync(self.unet) if not last else contextlib.nullcontext()
            with sync, self.accelerator.autocast():
                loss = batch_loss(self.unet, self.text, scheduler, batch, self.noise, dtype, cfg.loss) / len(group)
                self.accelerator.backward(loss)
            total += loss.detach()
        loss = self.accelerator.reduce(total, reduction="mean")
        params = self.unet_params + self.text_params
        step_unless_nonfinite(self.accelerator, self.optimizer, loss, params, cfg.optimizer.max_grad_norm)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    # ----- reporting, commands, epoch ends ------------------------------------------------------

    def _step_record(self, progress: Progress, step_times: list[float], started: float) -> StepRecord:
        """The step just taken, its loss still to be read back (NaN until then)."""
        return StepRecord(
            step=progress.step,
            total_steps=self.plan.total_steps,
            epoch=progress.epoch,
            total_epochs=self.plan.epochs,
            loss=math.nan,
            lr=self.lr_scheduler.get_last_lr()[0],
            its=len(step_times) / sum(step_times),
            elapsed=time.perf_counter() - started,
        )

    def _read_losses(self, progress: Progress) -> None:
        """Report the steps whose loss was still on the device; stop, or log the skip, at a non-finite one."""
        for record in self.losses.take():
            if not math.isfinite(record.loss):
                if self.config.loss.on_nan == "stop":
                    raise nonfinite_loss_error(record.loss, record.step, self.config.optimizer.learning_rate)
                # The step keeps its number and its batch is used up, so the run's length, epoch ends and
                # resume positions stay as planned; it only leaves a gap in the loss curve.
                self._say(f"skipped step {record.step}: loss was {record.loss}")
                continue
            progress.epoch_losses.append(record.loss)
            if self.run_log:
                self.run_log.step(record)
            self.callbacks.on_step(record)

    def _obey_commands(self, progress: Progress) -> bool:
        """Act on pause, sample-now and save-now; True when a stop was asked for."""
        if self.commands.pending:
            self._read_losses(progress)  # what the user sees, and a checkpoint, include every step so far
        if self.commands.paused:
            self.callbacks.on_status("paused")
            self.commands.wait_while_paused()
            self.callbacks.on_status("training")
        if self.commands.take_sample_request() and not self.commands.stop_requested:  # a stop wins over samples
            self._sample(self.run_dir / "samples" / f"step-{progress.step:06d}", progress.epoch)
        if self.commands.take_save_request():
            if self.loras:
                self.loras.save(f"{self.config.run.name}-step{progress.step:06d}", progress, "manual")
            self._checkpoint(progress)
        return self.commands.stop_requested

    def _end_of_epoch(self, progress: Progress) -> bool:
        """Validate, keep the best, save and sample as configured; True when early stopping ends the run."""
        cfg, epoch = self.config, progress.epoch
        val_loss = None
        if self.validation and cfg.validation.every_n_epochs and epoch % cfg.validation.every_n_epochs == 0:
            val_loss = self._validate_and_track(progress)
        record = progress.epoch_record(val_loss, self.lr_scheduler.get_last_lr()[0])
        if self.run_log:
            self.run_log.epoch(record)
        self.callbacks.on_epoch(record)
        if self.loras and cfg.saving.every_n_epochs and epoch % cfg.saving.every_n_epochs == 0:
            self.loras.save(f"{cfg.run.name}-e{epoch:04d}", progress, "epoch")
        if cfg.sampling.every_n_epochs and epoch % cfg.sampling.every_n_epochs == 0:
            self._sample(self.run_dir / "samples" / f"epoch-{epoch:04d}", epoch)
        next_position = Progress(**{**progress.__dict__, "epoch": epoch + 1, "next_batch": 0, "epoch_losses": []})
        if cfg.saving.checkpoint_every_n_epochs and epoch % cfg.saving.checkpoint_every_n_epochs == 0:
            self._checkpoint(next_position, next_epoch=True)
        self.callbacks.on_status("training")
        return self._patience_exhausted(progress)

    def _validate_and_track(self, progress: Progress) -> float:
        """One validation: record it, and keep the LoRA as `<name>-best` when it is the lowest so far."""
        self.callbacks.on_status("validating")
        text, scheduler = TextEncoders.of(self.components), self.components.noise_scheduler
        with self.accelerator.autocast():
            val_loss = validation_loss(self.lora_unet, text, scheduler, self.validation, self.weight_dtype)
        is_best = progress.record_validation(val_loss)
        if is_best and self.loras:
            self.loras.save(f"{self.config.run.name}-best", progress, "best")
        record = ValidationRecord(progress.step, progress.epoch, val_loss, is_best)
        if self.run_log:
            self.run_log.validation(record)
        self.callbacks.on_validation(record)
        self.callbacks.on_status("training")
        return val_loss

    def _patience_exhausted(self, progress: Progress) -> bool:
        patience = self.config.validation.early_stop_patience
        if patience and progress.validations_without_improvement >= patience:
            self._say(f"early stop: {patience} validations without a new best (best epoch {progress.best_epoch})")
            return True
        return False

    def _sample(self, folder: Path, epoch: int) -> None:
        if self.accelerator.is_main_process and self.config.sampling.prompts:
            self.callbacks.on_status("sampling")
            paths = render_samples(self.components, self.config.sampling, folder, self.accelerator.device)
            self.callbacks.on_sample(epoch, paths)
            self.callbacks.on_status("training")

    def _checkpoint(self, progress: Progress, next_epoch: bool = False) -> None:
        if self.accelerator.is_main_process:
            history = self.run_log.history if self.run_log else []
            state = self.resumable.capture(dict(progress.__dict__), history, next_epoch)
            self.callbacks.on_saved(save_checkpoint(self.run_dir, state), "checkpoint")

    def _record_end(self, status: str, error: Exception | None = None) -> None:
        if self.accelerator.is_main_process:
            if self.text_log:
                self.text_log.close(explain_error(error) if error else "")
            record_end(self.run_dir, status, error)

    def _finish(self, progress: Progress, status: str) -> None:
        if self.loras:
            self.loras.save(self.config.run.name, progress.capped(self.plan.epochs), "final")
        self._checkpoint(progress)
        self.accelerator.wait_for_everyone()
        best = progress.best_epoch and f"best epoch {progress.best_epoch} (val loss {progress.best_val_loss:.5f})"
        self._say(f"{status} at step {progress.step}. {best or ''}".strip())
