"""The images a model takes, and the one preprocessing used both to train it and to serve it:
pixel values (0–255) resized to the model's size, then normalised per channel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.5  # the normalisation every anchor of a zoo is trained with: (x/255 - 0.5) / 0.5


@dataclass(frozen=True)
class InputSpec:
    """Channels, size (H, W) and per-channel normalisation of a model's input images."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...] = (MEAN,)
    std: tuple[float, ...] = (STD,)

    def __post_init__(self) -> None:
        if self.channels < 1 or len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"bad input spec: channels {self.channels}, size {self.size}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) == 1:  # one value for every channel
                object.__setattr__(self, name, tuple(v) * self.channels)
            elif len(v) != self.channels:
                raise ValueError(f"input spec {name} has {len(v)} values for {self.channels} "
                                 "channels: give one value or one per channel")
        if min(self.std) <= 0:
            raise ValueError(f"input spec std must be > 0, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, *self.size)

    def to_meta(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": list(self.size), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> "InputSpec":
        """Parse `to_meta`'s form; ValueError naming what is wrong otherwise."""
        try:
            return cls(int(d["channels"]), (int(d["size"][0]), int(d["size"][1])),
                       tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"bad input spec {d!r}: expected channels, size [H, W], mean "
                             f"and std ({exc!r})") from None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values 0–255 (any dtype), N×C×H×W with C = `channels`, as the model's input:
        resized (bilinear, antialiased) to `size`, then normalised."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images N×{self.channels}×H×W, got {tuple(x.shape)}")
        x = x.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True,
                              align_corners=False)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((x / 255 - mean) / std).contiguous()
