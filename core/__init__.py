"""Atelier's engine, one package per capability: config, data, models, lora, training, inference, captioning,
and the helpers they share (common). The modules left at this level are the command-line entry points
(`python -m core.train`, `core.generate`, `core.caption`, `core.lora_tools`, `core.config_docs`): argparse
and terminal output only. No UI code lives here.
"""
