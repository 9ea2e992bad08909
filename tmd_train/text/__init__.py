"""Text encoders: the fixed toy encoder of the moving-shapes world (`toy_encoder`)."""
