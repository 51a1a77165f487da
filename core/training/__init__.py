"""Training a LoRA: the trainer and its step (trainer, losses, optim), the training set and its batches (batches),
validation, checkpoints and resumable run state (checkpoint, run_state), the run log and metrics (run_log,
loss_readback), sample images (samples), checks and estimates before a run (preflight, estimates), the model
prepared for training (model_setup), LoRA saving (lora_saver), and the session API the UI drives with its events
(session, events).
"""
