"""Text encoders of the real models: :mod:`~tmd_train.text.umt5` (``PromptEncoder``, Wan2.1's UMT5
prompt encoding). The toy world's encoder lives with the toy world in :mod:`tmd_train.toy`."""
