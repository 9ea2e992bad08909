"""Datasets on disk (`format`) and the procedural moving-shapes video world (`shapes`)."""
