"""Generating images with LoRAs: the engine that runs a request (engine), requests and their errors (requests), the
A1111 parameters a PNG carries and their restore (a1111_params, png_info), samplers, soft masks and inpainting
(masks, inpaint), the LoRA stack on a loaded model (lora_stack) and style sweeps (sweep).
"""
