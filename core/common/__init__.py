"""Helpers every part of the engine shares: atomic file writes and backups (fsutil), the folders the app may touch
(workspace), this install's signing key (install_key), quiet imports of noisy libraries (quiet) and the gist of an
error (errors). Nothing here knows about models, training or the UI.
"""
