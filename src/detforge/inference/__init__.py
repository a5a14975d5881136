"""Inference: predict on images, folders and videos; export; serve."""
