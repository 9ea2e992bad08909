"""Datasets on disk (`format`) and the data sources the trainers read (`sources`)."""
