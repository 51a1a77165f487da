"""Atelier's engine: config, dataset, models, LoRA, training, inference. No UI code lives here."""
