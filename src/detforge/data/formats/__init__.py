"""Annotation formats: one module per labelling tool's format; the name tables are in ``registry``."""
