"""Centred kernel alignment (CKA) between layer representations.

Sources:
- Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network
  Representations Revisited" — linear CKA (feature and Gram forms).
- Nguyen, Raghu & Kornblith (2021), "Do Wide and Deep Networks Learn the Same
  Things?" — minibatch CKA built on the unbiased HSIC₁ of Song et al. (2012).

All arithmetic is done in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .segments import Segment

__all__ = ["linear_cka", "hsic1", "MinibatchCKA", "minibatch_cka", "cka_matrix"]

_MIN_BATCH_MSG = (
    "minibatch CKA needs batches of at least 4 examples; use a larger batch or drop_last=True"
)


def _flat64(t: torch.Tensor) -> torch.Tensor:
    """Flatten to (n, -1) and convert to float64."""
    return t.reshape(t.shape[0], -1).to(torch.float64)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between x (n×p1) and y (n×p2); extra dims are flattened per example.

    Uses the feature form when n > max(p1, p2), else the Gram form (cheaper for
    p > n). Returns nan when either representation is constant across examples.
    """
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs x and y with the same number of examples along dim 0, "
            f"got shapes {tuple(x.shape)} and {tuple(y.shape)}; pass activations of the same inputs"
        )
    if x.shape[0] < 2:
        raise ValueError(
            f"linear_cka needs at least 2 examples, got {x.shape[0]}; pass a batch of n >= 2 rows"
        )
    x, y = _flat64(x), _flat64(y)
    n = x.shape[0]
    if n > max(x.shape[1], y.shape[1]):
        xc, yc = x - x.mean(0), y - y.mean(0)
        num = (yc.T @ xc).square().sum()
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    else:
        kc, lc = _centre_gram(x @ x.T), _centre_gram(y @ y.T)
        num = (kc * lc).sum()
        den = torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)
    return (num / den).item()


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """HKH with H = I − 11ᵀ/n, without forming H."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC₁ (Song et al. 2012) of two n×n Gram matrices, as a float64 scalar."""
    if k.shape != l.shape or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"hsic1 needs two square Gram matrices of the same size, got {tuple(k.shape)} "
            f"and {tuple(l.shape)}; build them from the same batch"
        )
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"{_MIN_BATCH_MSG} (got {n})")
    kt = k.to(torch.float64).clone()
    lt = l.to(torch.float64).clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    trace = (kt * lt.T).sum()
    middle = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (kt.sum(0) @ lt.sum(1))
    return (trace + middle - last) / (n * (n - 3))


def _u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centre a Gram (Székely & Rizzo 2014) so ⟨Ũ(K), Ũ(L)⟩ / (n(n−3)) = HSIC₁(K, L)."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    col = k.sum(0, keepdim=True) / (n - 2)
    row = k.sum(1, keepdim=True) / (n - 2)
    u = k - col - row + k.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0)
    return u


class MinibatchCKA:
    """Accumulates minibatch CKA (unbiased HSIC₁, float64) for a grid of layers × layers.

    Each layer's Gram is built once per batch and U-centred; all HSIC₁ terms of
    the grid then come from one matrix product of the flattened U-centred Grams.
    """

    def __init__(self, n_x: int, n_y: int) -> None:
        if n_x < 1 or n_y < 1:
            raise ValueError(f"MinibatchCKA needs n_x, n_y >= 1, got {n_x}, {n_y}")
        self.n_x, self.n_y = n_x, n_y
        self._xy = torch.zeros(n_x, n_y, dtype=torch.float64)
        self._xx = torch.zeros(n_x, dtype=torch.float64)
        self._yy = torch.zeros(n_y, dtype=torch.float64)
        self._batches = 0

    @staticmethod
    def _stack(acts: Sequence[torch.Tensor], b: int, device: torch.device) -> torch.Tensor:
        """(len(acts), b*b) matrix of flattened U-centred Grams, on `device`."""
        grams = []
        for a in acts:
            if a.shape[0] != b:
                raise ValueError(
                    f"all activations of one update need the same batch size, expected {b}, "
                    f"got {a.shape[0]}; feed every layer the same minibatch"
                )
            f = _flat64(a)
            grams.append(_u_centre(f @ f.T).reshape(-1).to(device))
        return torch.stack(grams)

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: n_x activations of model X and n_y of model Y, each B×..."""
        if len(xs) != self.n_x or len(ys) != self.n_y:
            raise ValueError(
                f"expected {self.n_x} x-activations and {self.n_y} y-activations, "
                f"got {len(xs)} and {len(ys)}; pass one tensor per tracked layer"
            )
        b = xs[0].shape[0]
        if b < 4:
            raise ValueError(f"{_MIN_BATCH_MSG} (got {b})")
        dev = xs[0].device
        ux, uy = self._stack(xs, b, dev), self._stack(ys, b, dev)
        scale = b * (b - 3)
        self._xy += (ux @ uy.T / scale).cpu()
        self._xx += (ux.square().sum(1) / scale).cpu()
        self._yy += (uy.square().sum(1) / scale).cpu()
        self._batches += 1

    def compute(self) -> torch.Tensor:
        """n_x × n_y float64 CKA matrix: ΣHSIC₁(K,L) / sqrt(ΣHSIC₁(K,K)·ΣHSIC₁(L,L)).

        The product of self-HSIC sums is clamped at a tiny positive value, and
        entries whose x- or y-self-HSIC sum is ≤ 0 (degenerate layer) are 0.
        """
        if self._batches == 0:
            raise RuntimeError("MinibatchCKA.compute() called before any update(); feed batches first")
        prod = self._xx[:, None] * self._yy[None, :]
        cka = self._xy / prod.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        valid = (self._xx[:, None] > 0) & (self._yy[None, :] > 0)
        return torch.where(valid, cka, torch.zeros_like(cka))


def minibatch_cka(x_batches: Iterable[torch.Tensor], y_batches: Iterable[torch.Tensor]) -> float:
    """Minibatch CKA of one pair of representations over paired batches."""
    acc = MinibatchCKA(1, 1)
    for xb, yb in zip(x_batches, y_batches, strict=True):
        acc.update([xb], [yb])
    return acc.compute()[0, 0].item()


@torch.no_grad()
def cka_matrix(front: Sequence[Segment], back: Sequence[Segment], data: torch.Tensor,
               batch_size: int = 64) -> torch.Tensor:
    """Minibatch CKA between every body boundary of two split models over `data` images.

    Entry (i, j) compares front segment i's output with back segment j's output (the heads'
    logits are left out). ViT features are the patch tokens; prefix tokens are excluded.
    A trailing partial batch is dropped (HSIC₁ needs batches of at least 4).
    """
    if len(data) < batch_size or batch_size < 4:
        raise ValueError(f"cka_matrix needs at least one full batch of >= 4 images; got "
                         f"{len(data)} images with batch_size={batch_size}")
    acc = MinibatchCKA(len(front) - 1, len(back) - 1)

    def features(segments: Sequence[Segment], x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for seg in segments[:-1]:
            x = seg(x)
            out.append(x[:, seg.num_prefix:] if seg.form == "tokens" else x)
        return out

    for k in range(0, len(data) - batch_size + 1, batch_size):
        xb = data[k: k + batch_size]
        acc.update(features(front, xb), features(back, xb))
    return acc.compute()
