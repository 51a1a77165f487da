"""LoRA adapters and their files: adding adapters to a model for training (adapters), reading and writing kohya/A1111
and diffusers LoRA files with their metadata and A1111 hash (files), rank changes by SVD (svd), merging into or
extracting from a checkpoint (merge) and the file tools behind python -m core.lora_tools: inspect, convert, resize,
combine (tools).
"""
