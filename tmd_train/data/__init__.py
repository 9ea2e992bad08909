"""Datasets on disk (`format`), the data sources the trainers read (`sources`) and video clips for the VAE
(`video`: PyAV decoding, frame-rate sampling, resize and centre crop)."""
