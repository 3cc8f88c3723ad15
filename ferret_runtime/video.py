"""Video input: frames decoded with PyAV, sampled, and scored through the same Detector pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageError
from .preprocess import check_regular_file

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class Frame:
    index: int  # position in the decoded stream, 0-based
    time: float  # presentation time in seconds
    image: np.ndarray  # uint8 HWC RGB

    def name(self, path: str | Path) -> str:
        return f"{path}#frame={self.index}"


def iter_frames(path: str | Path, every: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Every ``every``-th frame of the first video stream, at most ``max_frames`` of them."""
    if every < 1:
        raise ConfigError(f"Received --every {every}; expected >= 1")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"Received --max-frames {max_frames}; expected >= 1")
    try:
        import av
    except ImportError:
        raise ConfigError(f"{path}: video input needs PyAV: pip install 'ferretnet-deploy[video]'") from None
    path = Path(path)
    check_regular_file(path, str(path))  # a FIFO named clip.mp4 would block PyAV's open forever
    try:
        container = av.open(str(path))
    except (av.FFmpegError, ValueError) as e:
        raise ImageError(f"{path}: not a video PyAV can open ({e})") from None
    with container:
        if not container.streams.video:
            raise ImageError(f"{path}: contains no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding
        taken = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % every:
                    continue
                t = float(frame.pts * stream.time_base) if frame.pts is not None else float("nan")
                yield Frame(i, t, frame.to_ndarray(format="rgb24"))
                taken += 1
                if max_frames is not None and taken >= max_frames:
                    return
        except av.FFmpegError as e:
            raise ImageError(f"{path}: decoding failed after {taken} sampled frames ({e})") from None


@dataclass
class VideoSummary:
    path: str
    frames: int = 0
    fake: int = 0
    prob_sum: float = 0.0

    def add(self, prob_fake: float, label: str) -> None:
        self.frames += 1
        self.fake += label == "fake"
        self.prob_sum += prob_fake

    def to_dict(self) -> dict:
        return {"path": self.path, "summary": {"frames": self.frames, "fake_share": self.fake / max(self.frames, 1),
                                               "mean_prob_fake": self.prob_sum / max(self.frames, 1)}}

    def line(self) -> str:
        d = self.to_dict()["summary"]
        return (f"{self.path}: {d['frames']} frames scored, {100 * d['fake_share']:.1f}% judged synthetic, "
                f"mean prob_fake {d['mean_prob_fake']:.4f}")
