"""Shared helpers of the test suite: the tiny random Wan teacher (``support.tiny``), the tiny
real-format Wan diffusers folder (``support.wan_folder``), and the subprocess runners
(``support.run``: the ``python -m`` CLI runner and the 2-process ``torchrun`` launcher)."""
