"""Tests for stitch_lib.cka: linear CKA, unbiased HSIC₁ and minibatch CKA."""

from itertools import permutations

import pytest
import torch

from stitch_lib.cka import MinibatchCKA, hsic1, linear_cka, minibatch_cka


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _ref_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Naive Gram-form CKA with an explicit centring matrix H = I − 11ᵀ/n."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    kc, lc = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (torch.trace(kc @ lc) / torch.sqrt(torch.trace(kc @ kc) * torch.trace(lc @ lc))).item()


def _ref_hsic1_ustat(k: torch.Tensor, l: torch.Tensor) -> float:
    """HSIC as a U-statistic over all ordered 4-tuples of distinct indices (Song et al. 2012)."""
    n = k.shape[0]
    total = 0.0
    for i, j, q, r in permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return float(total) / (n * (n - 1) * (n - 2) * (n - 3))


def _ref_hsic1_loops(k: torch.Tensor, l: torch.Tensor) -> float:
    """The closed form of HSIC₁ (Nguyen et al. 2021, eq. 3) with explicit loops."""
    n = k.shape[0]
    kt = [[0.0 if i == j else float(k[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, kt))
    sum_l = sum(map(sum, lt))
    one_kl_one = sum(kt[i][j] * lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    val = trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * one_kl_one
    return val / (n * (n - 3))


def _gram(x: torch.Tensor) -> torch.Tensor:
    f = x.reshape(x.shape[0], -1).double()
    return f @ f.T


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, d, g=g))
    return q


# ---------------------------------------------------------------- linear CKA


@pytest.mark.parametrize(("n", "p1", "p2"), [(200, 10, 7), (12, 40, 25)])
def test_linear_cka_matches_reference(n: int, p1: int, p2: int) -> None:
    g = _gen(0)
    x = _randn(n, p1, g=g)
    y = x[:, : min(p1, p2)] @ _randn(min(p1, p2), p2, g=g) + 0.5 * _randn(n, p2, g=g)
    assert linear_cka(x, y) == pytest.approx(_ref_linear_cka(x, y), abs=1e-6)


def test_linear_cka_feature_and_gram_forms_agree() -> None:
    g = _gen(1)
    x, y = _randn(50, 8, g=g), _randn(50, 6, g=g)
    y[:, :3] += x[:, :3]
    feature_form = linear_cka(x, y)  # n > p: feature form
    padded = torch.cat([x, torch.zeros(50, 60, dtype=torch.float64)], dim=1)
    gram_form = linear_cka(padded, y)  # p > n: Gram form; zero columns change nothing
    assert feature_form == pytest.approx(gram_form, abs=1e-9)
    assert 0.1 < feature_form < 0.9


def test_linear_cka_flattens_and_accepts_float32() -> None:
    g = _gen(2)
    x, y = _randn(30, 2, 3, 4, g=g), _randn(30, 5, 2, g=g)
    expected = _ref_linear_cka(x, y)
    assert linear_cka(x.float(), y.float()) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("n", "p"), [(300, 16), (10, 64)])
def test_linear_cka_self_and_invariances(n: int, p: int) -> None:
    g = _gen(3)
    x = _randn(n, p, g=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, x @ _orthogonal(p, g)) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-6)
    y = x[:, : p // 2] + _randn(n, p // 2, g=g)
    q = _orthogonal(p // 2, g)
    assert linear_cka(x, y @ q) == pytest.approx(linear_cka(x, y), abs=1e-6)


def test_linear_cka_not_invariant_to_anisotropic_map() -> None:
    g = _gen(4)
    x = _randn(400, 10, g=g)
    aniso = torch.diag(torch.logspace(0, 2, 10, dtype=torch.float64)) + 0.3 * _randn(10, 10, g=g)
    assert linear_cka(x, x @ aniso) < 0.8


def test_linear_cka_errors() -> None:
    g = _gen(5)
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(_randn(10, 3, g=g), _randn(11, 3, g=g))
    with pytest.raises(ValueError, match="at least 2 examples"):
        linear_cka(_randn(1, 3, g=g), _randn(1, 3, g=g))


# --------------------------------------------------------------------- HSIC₁


@pytest.mark.parametrize("n", [4, 5, 7])
def test_hsic1_matches_u_statistic(n: int) -> None:
    g = _gen(10 + n)
    x = _randn(n, 3, g=g)
    y = x @ _randn(3, 4, g=g) + _randn(n, 4, g=g)
    got = hsic1(_gram(x), _gram(y))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_ref_hsic1_ustat(_gram(x), _gram(y)), abs=1e-9)


def test_hsic1_matches_closed_form_loops() -> None:
    g = _gen(20)
    x, y = _randn(12, 5, g=g), _randn(12, 3, g=g)
    k, l = _gram(x), _gram(y) + torch.diag(_randn(12, g=g))  # diagonal must be ignored
    assert hsic1(k, l).item() == pytest.approx(_ref_hsic1_loops(k, l), abs=1e-9)
    assert hsic1(k.float(), k.float()).item() == pytest.approx(_ref_hsic1_loops(k, k), rel=1e-6)


def test_hsic1_does_not_modify_inputs() -> None:
    g = _gen(21)
    k = _gram(_randn(6, 3, g=g))
    before = k.clone()
    hsic1(k, k)
    assert torch.equal(k, before)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_hsic1_small_batch_raises(n: int) -> None:
    k = _gram(_randn(n, 3, g=_gen(22)))
    with pytest.raises(ValueError, match="at least 4 examples"):
        hsic1(k, k)


# ------------------------------------------------------------ minibatch CKA


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


def test_minibatch_cka_single_batch_equals_hsic1_ratio() -> None:
    g = _gen(30)
    x, y = _randn(9, 4, g=g), _randn(9, 6, g=g)
    k, l = _gram(x), _gram(y)
    expected = hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l))
    assert minibatch_cka([x], [y]) == pytest.approx(expected.item(), abs=1e-9)


def test_minibatch_cka_self_and_orthogonal() -> None:
    g = _gen(31)
    x = _randn(20 * 64, 32, g=g)
    xq = x @ _orthogonal(32, g)
    assert minibatch_cka(_batches(x, 64), _batches(x, 64)) == pytest.approx(1.0, abs=1e-9)
    assert minibatch_cka(_batches(x, 64), _batches(xq, 64)) == pytest.approx(1.0, abs=1e-9)


def test_minibatch_cka_independent_noise_near_zero() -> None:
    g = _gen(32)
    x, noise = _randn(20 * 64, 32, g=g), _randn(20 * 64, 32, g=g)
    assert abs(minibatch_cka(_batches(x, 64), _batches(noise, 64))) < 0.1


def test_minibatch_cka_approaches_full_data_cka() -> None:
    g = _gen(33)
    x = _randn(64 * 64, 16, g=g)
    y = x @ _randn(16, 8, g=g) + 2.0 * _randn(64 * 64, 8, g=g)
    full = linear_cka(x, y)
    assert 0.2 < full < 0.9
    assert minibatch_cka(_batches(x, 64), _batches(y, 64)) == pytest.approx(full, abs=0.05)


def test_minibatch_cka_grid_matches_pairwise() -> None:
    g = _gen(34)
    n_batches, bs = 5, 16
    a = _randn(n_batches * bs, 3, 4, g=g)
    b = a.reshape(-1, 12)[:, :6] + 0.5 * _randn(n_batches * bs, 6, g=g)
    c = _randn(n_batches * bs, 2, 5, g=g).float()
    acc = MinibatchCKA(2, 3)
    for i in range(n_batches):
        sl = slice(i * bs, (i + 1) * bs)
        acc.update([a[sl], b[sl]], [a[sl], b[sl], c[sl]])
    grid = acc.compute()
    assert grid.shape == (2, 3)
    assert grid.dtype == torch.float64
    for i, xi in enumerate([a, b]):
        for j, yj in enumerate([a, b, c]):
            pair = minibatch_cka(_batches(xi, bs), _batches(yj, bs))
            assert grid[i, j].item() == pytest.approx(pair, abs=1e-9)
    assert grid[0, 0].item() == pytest.approx(1.0, abs=1e-9)


def test_minibatch_cka_degenerate_layer_is_zero() -> None:
    g = _gen(35)
    x = _randn(32, 5, g=g)
    const = torch.ones(32, 5, dtype=torch.float64)
    assert abs(minibatch_cka(_batches(x, 8), _batches(const, 8))) < 1e-6  # self-HSIC ~ roundoff
    zeros = torch.zeros(32, 5, dtype=torch.float64)
    assert minibatch_cka(_batches(x, 8), _batches(zeros, 8)) == 0.0  # self-HSIC exactly 0


def test_minibatch_cka_errors() -> None:
    g = _gen(36)
    acc = MinibatchCKA(1, 2)
    with pytest.raises(RuntimeError, match="before any update"):
        acc.compute()
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update([_randn(3, 2, g=g)], [_randn(3, 2, g=g), _randn(3, 2, g=g)])
    with pytest.raises(ValueError, match="one tensor per tracked layer"):
        acc.update([_randn(8, 2, g=g)], [_randn(8, 2, g=g)])
    with pytest.raises(ValueError, match="same batch size"):
        acc.update([_randn(8, 2, g=g)], [_randn(8, 2, g=g), _randn(9, 2, g=g)])
