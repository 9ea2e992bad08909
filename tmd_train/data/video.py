"""Video clips for the VAE: decoding with PyAV, resampling to a frame rate, resizing and centre cropping.

:func:`read_clip` returns ``frames`` frames of a video file, sampled at ``fps`` from its start (frame
``k`` is the last source frame shown at time ``k / fps``), resized so that the frame covers
``height × width`` (aspect ratio kept, antialiased bilinear) and centre-cropped, as ``[3, F, H, W]``
float32 in ``[-1, 1]`` (``x / 127.5 - 1``, the pixel range Wan's VAE takes). A video that cannot be
opened or decoded, or that is too short for ``frames`` frames at ``fps``, raises :class:`ClipError`
with the reason (the caller records it and skips the clip).
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F


class ClipError(ValueError):
    """A video that cannot give the requested clip (the message is the reason; ``kind`` is one of
    ``"missing"``, ``"open"`` (not a readable video), ``"decode"`` (broken/truncated stream), ``"short"``)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _frame_times(stream) -> float:
    """Seconds per unit of the stream's pts."""
    return float(stream.time_base) if stream.time_base else 0.0


def decode_frames(path: str | os.PathLike, fps: float, frames: int) -> torch.Tensor:
    """``[frames, h, w, 3]`` uint8: the frames shown at times ``k / fps``, ``k = 0..frames-1``, counted
    from the first decoded frame."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ClipError(f"cannot open video: {e}", "open") from None
    picked: list = []
    try:
        if not container.streams.video:
            raise ClipError("no video stream", "open")
        stream = container.streams.video[0]
        unit = _frame_times(stream)
        avg = stream.average_rate or stream.guessed_rate or Fraction(fps)
        start = None
        last = None
        t = 0.0
        next_k = 0
        n_decoded = 0
        try:
            for frame in container.decode(stream):
                n_decoded += 1
                t = (frame.pts * unit if frame.pts is not None and unit else (n_decoded - 1) / float(avg))
                if start is None:
                    start = t
                t -= start
                # every target time before this frame's time is shown by the previous frame
                while next_k < frames and next_k / fps < t - 1e-9:
                    if last is None:
                        break
                    picked.append(last)
                    next_k += 1
                if next_k >= frames:
                    break
                last = frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, OSError) as e:
            if len(picked) < frames:
                raise ClipError(f"decoding failed after {n_decoded} frames: {e}", "decode") from None
        if next_k < frames and last is not None:
            # the last decoded frame is shown until one frame period after its time
            duration = t + 1.0 / float(avg)
            while next_k < frames and next_k / fps < duration - 1e-9:
                picked.append(last)
                next_k += 1
    finally:
        container.close()
    if not picked or len(picked) < frames:
        have = len(picked)
        if not have:
            raise ClipError("no decodable frames", "decode")
        raise ClipError(f"too short: {have} of {frames} frames at {fps:g} fps (needs {frames / fps:.3g} s of video)",
                        "short")
    return torch.from_numpy(np.stack(picked[:frames]))


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[F, h, w, 3]`` uint8 -> ``[3, F, height, width]`` float32 in ``[-1, 1]``: scaled so that the frame
    covers ``height × width`` (antialiased bilinear), then centre-cropped."""
    x = frames.permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0, 255)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def read_clip(path: str | os.PathLike, *, frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """``[3, frames, height, width]`` float32 in ``[-1, 1]`` (module docstring); :class:`ClipError` on a bad video."""
    if not os.path.isfile(path):
        raise ClipError("no such file", "missing")
    return resize_crop(decode_frames(path, fps, frames), height, width)
