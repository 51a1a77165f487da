"""The Gradio UI: one module per tab, each binding widgets to core's APIs (no torch here)."""
