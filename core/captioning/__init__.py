"""Captions: the captioner models (models), a captioning run over a dataset (job), caption files and their signed,
restorable backups (backups), editing one caption with undo (editor), bulk edits (bulk_edits) and the tiny demo
captioner (demo).
"""
