"""The training settings: the schema every field comes from (schema), reading and writing TOML configs, presets and
--set overrides (files), and the reference text python -m core.config_docs prints (docs). Importing it loads no
torch.
"""
