"""The lattice's fixed stencils as operators over all cells at once: the gated connection message and the 3D
Sobel/Laplacian kernels.

Every stencil is either one sparse ``(N, N)`` CSR product over all ``N = D·H·W`` cells and the whole batch
(:class:`SparseOperator`; the message operator's values are the connection weights, gathered once per forward) or,
without any index buffer, a sum of shifted dense views (:class:`ShiftOperator`, :func:`separable_kernels`). On CPU
the CSR product is ~50x faster than 26 shifted dense adds and needs no ``(B, C, N, 26)`` intermediate; the shifted
views need no ``~3.5 kB`` per cell of CSR patterns (see docs/lattice_scale.md). No Python loop over cells runs here.

Cells are numbered ``n = (d·H + h)·W + w``; the state is cell-major ``(N, F)``.

Axis legend: ``d h w`` lattice depth/height/width, ``k`` neighbour direction, ``j`` perception kernels, ``f``
features (batch × channels), ``a b c`` kernel taps.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange

from neat_lightning.components.plasticity import N_NEIGHBOURS, neighbour_offsets


def sobel_laplacian_kernels() -> torch.Tensor:
    """Fixed 3D kernels -> (4, 3, 3, 3): Sobel along d, h, w (smoothing [1, 2, 1] ⊗ [1, 2, 1] ⊗ derivative
    [-1, 0, 1], scaled by 1/32) and the 27-point Laplacian (26 neighbours minus 26·centre, scaled by 1/26)."""
    smooth = torch.tensor([1.0, 2.0, 1.0])
    deriv = torch.tensor([-1.0, 0.0, 1.0])
    sobel_d = torch.einsum("i,j,k->ijk", deriv, smooth, smooth) / 32
    sobel_h = torch.einsum("i,j,k->ijk", smooth, deriv, smooth) / 32
    sobel_w = torch.einsum("i,j,k->ijk", smooth, smooth, deriv) / 32
    lap = torch.ones(3, 3, 3)
    lap[1, 1, 1] = -26.0
    return torch.stack([sobel_d, sobel_h, sobel_w, lap / 26])


def stencil_indices(size: tuple[int, int, int], offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lattice's connections as sparse-matrix coordinates, in row-major (cell, direction) order.

    Cells are numbered ``n = (d·H + h)·W + w``. Connection ``(x, k)`` links row ``x`` to column ``x + o_k``; those
    leaving the lattice are dropped.

    Args:
        size: (D, H, W).
        offsets: (K, 3) int64 neighbour offsets, lexicographically sorted (so columns increase along a row).

    Returns:
        ``(rows, cols, flat)``: (nnz,) int64 each; ``flat = x·K + k`` indexes a flattened ``(D, H, W, K)`` field.
    """
    D, H, W = size
    cells = torch.stack(torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij"), -1)
    cells = rearrange(cells, "d h w three -> (d h w) 1 three")
    nb = cells + offsets[None]  # (N, K, 3)
    valid = ((nb >= 0) & (nb < torch.tensor([D, H, W]))).all(-1)  # (N, K)
    cols = (nb[..., 0] * H + nb[..., 1]) * W + nb[..., 2]
    n, k = valid.nonzero(as_tuple=True)
    return n, cols[n, k], n * offsets.shape[0] + k


def transpose_permutation(rows: torch.Tensor, cols: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a row-major sparse pattern (rows, cols) of an n-column matrix: the transposed pattern's CSR row pointer
    (n + 1,) and the permutation ``perm`` such that ``values[perm]`` are the transpose's values in its row-major
    order (its columns are ``rows[perm]``)."""
    perm = torch.sort(cols * (int(rows.max()) + 1 if len(rows) else 1) + rows, stable=True).indices
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(cols, minlength=n), 0)
    return crow, perm


def crow_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    return crow


class SparseOperator:
    """A sparse matrix ``A`` (M, N) and its transpose in CSR form; :meth:`__call__` is ``A @ x`` with the gradient
    ``Aᵀ @ g`` (MKL CSR products on CPU, cuSPARSE on GPU; no coalescing in the backward)."""

    def __init__(self, a: torch.Tensor, at: torch.Tensor) -> None:
        self.a, self.at = a, at

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, F) -> (M, F)."""
        return _SparseMatmul.apply(x, self.a, self.at)


class _SparseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, at):
        ctx.at = at
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.at @ grad.contiguous(), None, None


def csr_matrix(crow, col, values, shape) -> torch.Tensor:
    """A sparse CSR tensor from its row pointer, column indices and values, without the invariant checks."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only CSR @ dense, long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _shifted(x: torch.Tensor, dim: int, offset: int) -> torch.Tensor:
    """``out[i] = x[i + offset]`` along ``dim`` (offset in {-1, 1}), zero where ``i + offset`` leaves the lattice."""
    n = x.shape[dim]
    inner = x.narrow(dim, max(offset, 0), n - 1)
    pad = [0, 0] * (x.dim() - 1 - dim) + ([1, 0] if offset < 0 else [0, 1])
    return F.pad(inner, pad)


class ShiftOperator:
    """The connection message ``m[x] = 1/26 Σ_k w[x, k]·s[x + o_k]`` as 26 shifted views of the dense state: the
    same operator as :meth:`LatticeRule.connection_operator`'s CSR matrix, without its index buffers."""

    def __init__(self, connections: torch.Tensor) -> None:
        self.size = tuple(connections.shape[:3])
        padded = F.pad(rearrange(connections, "d h w k -> k d h w"), (1, 1, 1, 1, 1, 1))  # zero outside
        self.weights = padded[..., None] / N_NEIGHBOURS  # (26, D+2, H+2, W+2, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, F) -> (N, F)."""
        D, H, W = self.size
        xp = F.pad(rearrange(x, "(d h w) f -> d h w f", d=D, h=H, w=W), (0, 0, 1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(xp[1:-1, 1:-1, 1:-1])
        for k, (dd, dh, dw) in enumerate(neighbour_offsets().tolist()):  # over the 26 directions, not cells
            w = self.weights[k, 1 : D + 1, 1 : H + 1, 1 : W + 1]
            out = out + w * xp[1 + dd : D + 1 + dd, 1 + dh : H + 1 + dh, 1 + dw : W + 1 + dw]
        return rearrange(out, "d h w f -> (d h w) f")


def separable_kernels(x: torch.Tensor) -> torch.Tensor:
    """The fixed Sobel d/h/w and 27-point Laplacian stencils of :func:`sobel_laplacian_kernels` by separable
    shifted adds (correlation, zero outside the lattice). x: (D, H, W, F) -> (4, D, H, W, F)."""
    prev = lambda t, d: _shifted(t, d, -1)  # noqa: E731
    nxt = lambda t, d: _shifted(t, d, 1)  # noqa: E731
    smooth = lambda t, d: prev(t, d) + 2 * t + nxt(t, d)  # noqa: E731
    deriv = lambda t, d: nxt(t, d) - prev(t, d)  # noqa: E731
    box = lambda t, d: prev(t, d) + t + nxt(t, d)  # noqa: E731
    s_w, d_w = smooth(x, 2), deriv(x, 2)
    sobel_d = deriv(smooth(s_w, 1), 0) / 32
    sobel_h = smooth(deriv(s_w, 1), 0) / 32
    sobel_w = smooth(smooth(d_w, 1), 0) / 32
    lap = (box(box(box(x, 2), 1), 0) - 27 * x) / 26
    return torch.stack([sobel_d, sobel_h, sobel_w, lap])

