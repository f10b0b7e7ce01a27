"""Stitch layers and hybrids: a front model's early segments → stitch → a back model's rest.

One `Stitch` class covers the four joins. Whatever the two sides are, the front activation is
viewed as a feature map (ViT patch tokens are laid back on their grid, prefix tokens kept
aside), resized to the back model's grid (average-pooled when larger, bilinearly upsampled when
smaller) and projected by a 1×1 convolution — a per-token `Linear` in ViT terms. Into a ViT the
map becomes tokens again; a per-position bias restores position information a CNN map lacks,
and each prefix token (CLS) is derived from the front's CLS token, or from the mean of the
front map, so it carries information about the image (a constant one would not).

The stitch is initialised by ridge least squares on calibration activations (float64), with
the ridge strength chosen per pair on held-out calibration images, as SN-Net initialises its
stitches with a pseudo-inverse.

With `hidden` > 0 the stitch also has a residual branch on the resized map, added to the
projection: a 1×1 convolution down to `hidden` channels, a 3×3 depthwise convolution, GELU,
and a 1×1 convolution up to the destination's channels, initialised to zero — so the stitch
starts exactly at its least-squares fit, and fine-tuning can then correct what no per-position
linear map can (neighbourhood context, non-linearity). Still only stitch parameters: the
anchors stay frozen and a deployment still carries only stitch tensors.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .segments import Port, Segment

RIDGE_GRID = (1e-5, 1e-3, 1e-1)
MAX_GRID_RATIO = 2  # a stitch may pool or upsample the grid by at most this factor per side
MAX_HIDDEN = 1024  # the widest residual branch a stitch may have


def to_map(t: torch.Tensor, port: Port) -> tuple[torch.Tensor, torch.Tensor | None]:
    """View an activation as a (B, C, H, W) map plus its prefix tokens (B, P, C) or None."""
    if port.form == "map":
        return t, None
    p, (h, w) = port.num_prefix, port.grid
    patches = t[:, p:].transpose(1, 2).reshape(t.shape[0], port.channels, h, w)
    return patches, (t[:, :p] if p else None)


def _resize(m: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) == grid:
        return m
    if m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(m, grid)
    return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)


def can_stitch(src: Port, dst: Port) -> bool:
    """Whether a stitch can join `src` to `dst`: two body activations whose grids differ by
    at most MAX_GRID_RATIO per side."""
    if "logits" in (src.form, dst.form):
        return False
    return all(1 / MAX_GRID_RATIO <= a / b <= MAX_GRID_RATIO for a, b in zip(src.grid, dst.grid))


class Stitch(nn.Module):
    """The trainable joint between two models' activations (see the module docstring)."""

    def __init__(self, src: Port, dst: Port, hidden: int = 0) -> None:
        super().__init__()
        if not can_stitch(src, dst):
            raise ValueError(f"cannot stitch {src} into {dst}: both must be feature maps or "
                             f"tokens whose grids differ by at most {MAX_GRID_RATIO}x per side")
        if not 0 <= hidden <= MAX_HIDDEN:
            raise ValueError(f"a stitch's hidden width must be in [0, {MAX_HIDDEN}] "
                             f"(0: the linear projection only), got {hidden}")
        self.src, self.dst, self.hidden = src, dst, hidden
        self.proj = nn.Conv2d(src.channels, dst.channels, kernel_size=1)
        if hidden:
            self.down = nn.Conv2d(src.channels, hidden, kernel_size=1)
            self.spatial = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
            self.up = nn.Conv2d(hidden, dst.channels, kernel_size=1)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.pos_bias = (nn.Parameter(torch.zeros(dst.channels, *dst.grid))
                         if dst.form == "tokens" and src.form == "map" else None)
        self.prefix_bias = (nn.Parameter(torch.zeros(dst.num_prefix, dst.channels))
                            if dst.form == "tokens" and dst.num_prefix else None)

    def summary(self, m: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """What a destination prefix token is derived from: the front CLS or the map mean."""
        return prefix[:, 0] if prefix is not None else m.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, prefix = to_map(x, self.src)
        m = _resize(m, self.dst.grid)
        y = self.proj(m)
        if self.hidden:
            y = y + self.up(F.gelu(self.spatial(self.down(m))))
        if self.dst.form == "map":
            return y
        if self.pos_bias is not None:
            y = y + self.pos_bias
        tokens = y.flatten(2).transpose(1, 2)
        if self.prefix_bias is None:
            return tokens
        w = self.proj.weight.flatten(1)
        cls = (self.summary(m, prefix) @ w.T).unsqueeze(1) + self.prefix_bias
        return torch.cat([cls, tokens], dim=1)

    def round_to_wire(self) -> "Stitch":
        """Round every tensor to fp16, the precision a deployment carries it in (the delta
        encoding of docs/protocol.md §5.1), so that what is measured is what a device runs."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.half().float())
        return self

    def extra_repr(self) -> str:
        return f"src={self.src}, dst={self.dst}, hidden={self.hidden}"


@dataclass
class _Moments:
    """Sufficient statistics of a least-squares problem, accumulated in float64."""

    xx: torch.Tensor | None = None
    xy: torch.Tensor | None = None
    yy: torch.Tensor | None = None  # per output column: sum of y²
    ysum: torch.Tensor | None = None
    n: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        parts = (x.T @ x, x.T @ y, (y * y).sum(0), y.sum(0))
        if self.xx is None:
            self.xx, self.xy, self.yy, self.ysum = parts
        else:
            for name, part in zip(("xx", "xy", "yy", "ysum"), parts):
                getattr(self, name).add_(part)
        self.n += len(x)

    def solve(self, ridge: float) -> torch.Tensor:
        p = self.xx.shape[0] - 1
        reg = torch.zeros_like(self.xx)
        reg.diagonal()[:p] = ridge * self.xx.diagonal()[:p].mean().clamp_min(1e-12)
        return torch.linalg.solve(self.xx + reg, self.xy)

    def r2(self, a: torch.Tensor) -> float:
        """Coefficient of determination of the solution `a` on these statistics."""
        sse = self.yy.sum() - 2 * (a * self.xy).sum() + (a * (self.xx @ a)).sum()
        sst = self.yy.sum() - (self.ysum ** 2).sum() / self.n
        return float(1 - sse / sst.clamp_min(1e-12))


def _rows(m: torch.Tensor) -> torch.Tensor:
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]).double()


@torch.no_grad()
def fit_stitch(stitch: Stitch, pairs: Iterator[tuple[torch.Tensor, torch.Tensor]],
               holdout_every: int = 5) -> dict[str, float]:
    """Initialise `stitch` by ridge least squares from (front, back) activation batches.

    Every `holdout_every`-th batch is held out to choose the ridge strength from RIDGE_GRID;
    the chosen one is then refit on all batches. Returns the ridge and the held-out R².
    """
    fit, held = _Moments(), _Moments()
    c_in, c_out = stitch.src.channels, stitch.dst.channels
    pos_sum_x = pos_sum_y = pre_sum_s = pre_sum_y = None
    n_images = 0
    for k, (a, b) in enumerate(pairs):
        m, prefix = to_map(a, stitch.src)
        m = _resize(m, stitch.dst.grid)
        target, target_prefix = to_map(b, stitch.dst)
        (held if k % holdout_every == holdout_every - 1 else fit).add(_rows(m), _rows(target))
        n_images += len(a)
        if stitch.pos_bias is not None:
            sx, sy = m.double().sum(0), target.double().sum(0)
            pos_sum_x = sx if pos_sum_x is None else pos_sum_x + sx
            pos_sum_y = sy if pos_sum_y is None else pos_sum_y + sy
        if stitch.prefix_bias is not None:
            ss, sy = stitch.summary(m, prefix).double().sum(0), target_prefix.double().sum(0)
            pre_sum_s = ss if pre_sum_s is None else pre_sum_s + ss
            pre_sum_y = sy if pre_sum_y is None else pre_sum_y + sy
    if fit.n == 0 or held.n == 0:
        raise ValueError(f"least-squares init needs at least {holdout_every} calibration "
                         "batches (one is held out to choose the ridge); pass more data")
    scores = {r: held.r2(fit.solve(r)) for r in RIDGE_GRID}
    ridge = max(scores, key=scores.get)
    for name in ("xx", "xy", "yy", "ysum"):
        getattr(fit, name).add_(getattr(held, name))
    fit.n += held.n
    a = fit.solve(ridge)
    w, bias = a[:c_in].T, a[c_in]
    stitch.proj.weight.copy_(w.reshape(c_out, c_in, 1, 1))
    stitch.proj.bias.copy_(bias)
    if stitch.pos_bias is not None:  # mean residual at each grid position
        mean_x, mean_y = pos_sum_x / n_images, pos_sum_y / n_images
        stitch.pos_bias.copy_(mean_y - torch.einsum("oc,chw->ohw", w, mean_x) - bias[:, None, None])
    if stitch.prefix_bias is not None:  # mean residual of each destination prefix token
        stitch.prefix_bias.copy_(pre_sum_y / n_images - (pre_sum_s / n_images) @ w.T)
    return {"ridge": ridge, "heldout_r2": scores[ridge]}


class Hybrid(nn.Module):
    """front[:i+1] → stitch → back[j+1:], with the anchors' segments shared, not copied."""

    def __init__(self, front: list[Segment], i: int, stitch: Stitch, back: list[Segment],
                 j: int, front_name: str = "front", back_name: str = "back") -> None:
        super().__init__()
        self.front = nn.Sequential(*front[: i + 1])
        self.stitch = stitch
        self.back = nn.Sequential(*back[j + 1:])
        self.i, self.j, self.front_name, self.back_name = i, j, front_name, back_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.stitch(self.front(x)))

    @property
    def name(self) -> str:
        """A readable name: front:cut→back:cut, cuts named after the segments."""
        return (f"{self.front_name}:{self.front[-1].name}→"
                f"{self.back_name}:{self.back[0].name}")

    def segment_ids(self) -> list[str]:
        """IDs of the anchor segments this hybrid runs, in order (front, then back)."""
        return [s.segment_id() for s in (*self.front, *self.back)]

    def freeze_anchors(self, frozen: bool = True) -> None:
        """Anchors frozen and kept in eval mode whatever `train()` is called with, since
        their segments are shared with the anchor models (BatchNorm statistics must not
        drift); `frozen=False` releases them for full fine-tuning of a copy."""
        self.anchors_frozen = frozen
        for part in (self.front, self.back):
            part.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Hybrid":
        super().train(mode)
        if getattr(self, "anchors_frozen", False):
            self.front.eval()
            self.back.eval()
        return self


@torch.no_grad()
def boundary_outputs(segments: list[Segment], x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every segment for the batch `x` (the last one is the logits)."""
    outs = []
    for seg in segments:
        x = seg(x)
        outs.append(x)
    return outs


def ports(segments: list[Segment], example: torch.Tensor) -> list[Port]:
    """The port of every segment boundary, read from one example batch."""
    return [s.port(o) for s, o in zip(segments, boundary_outputs(segments, example[:2]))]


def feasible_points(front: list[Segment], back: list[Segment],
                    example: torch.Tensor) -> list[tuple[int, int]]:
    """Every (i, j) where front boundary i can feed back boundary j.

    The back model keeps at least one body segment after the stitch: a stitch straight into
    the classifier head is a linear probe whose stitch is most of the bytes.
    """
    pf, pb = ports(front, example), ports(back, example)
    return [(i, j) for i in range(len(front) - 1) for j in range(len(back) - 2)
            if can_stitch(pf[i], pb[j])]


def build_hybrid(front: list[Segment], i: int, back: list[Segment], j: int,
                 calib: torch.Tensor, *, batch_size: int = 128, hidden: int = 0,
                 front_name: str = "front", back_name: str = "back") -> tuple[Hybrid, dict]:
    """Join front boundary `i` to back boundary `j` with a least-squares-initialised stitch
    (with a zero-initialised residual branch of width `hidden`, if > 0).

    `front`/`back` are `split_model` outputs; `calib` is a batch of calibration images. Either
    direction works: the ReStNet one puts the larger model in front. Returns the hybrid and
    the fit statistics of its stitch (ridge, held-out R²).
    """
    n_f, n_b = len(front), len(back)
    if not (0 <= i < n_f - 1 and 0 <= j < n_b - 2):
        raise ValueError(f"stitch point ({i}, {j}) out of range: i must be in [0, {n_f - 2}] "
                         f"(a front body boundary) and j in [0, {n_b - 3}] (a back boundary "
                         "that leaves at least one back body segment)")
    with torch.no_grad():
        pf = front[i].port(nn.Sequential(*front[: i + 1])(calib[:2]))
        pb = back[j].port(nn.Sequential(*back[: j + 1])(calib[:2]))
    stitch = Stitch(pf, pb, hidden)
    hybrid = Hybrid(front, i, stitch, back, j, front_name, back_name).eval()
    hybrid.freeze_anchors()
    back_part = nn.Sequential(*back[: j + 1]).eval()

    batch_size = max(1, min(batch_size, len(calib) // 5))  # fit_stitch holds 1 in 5 out

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for k in range(0, len(calib), batch_size):
                xb = calib[k: k + batch_size]
                yield hybrid.front(xb), back_part(xb)

    return hybrid, fit_stitch(stitch, pairs())
