import torch
from einops import rearrange

from neat_lightning.components.lattice import LatticeConfig, LatticeRule
from neat_lightning.components.lattice_stencils import (
    ShiftOperator,
    separable_kernels,
    sobel_laplacian_kernels,
    stencil_indices,
)
from neat_lightning.components.plasticity import neighbour_offsets

SIZE = (4, 3, 5)


def test_laplacian_of_constant_interior_is_zero():
    k = sobel_laplacian_kernels()
    assert k.shape == (4, 3, 3, 3)
    assert torch.allclose(k.sum((1, 2, 3)), torch.zeros(4), atol=1e-6)


def test_shift_operators_equal_the_csr_products():
    """The index-free operators (shifted views) compute the same message and kernels as the CSR products."""
    torch.manual_seed(0)
    rule = LatticeRule(LatticeConfig(*SIZE, channels=3, hidden=8, steps=4))
    w = torch.rand(*SIZE, 26)
    x = torch.randn(60, 6)  # (N, B·C)
    assert torch.allclose(ShiftOperator(w)(x), rule.connection_operator(w)(x), atol=1e-6)
    state = rearrange(x, "n (b c) -> n b c", b=2)
    sep = separable_kernels(rearrange(x, "(d h w) f -> d h w f", d=4, h=3, w=5))  # (4, D, H, W, B·C)
    assert torch.allclose(rearrange(sep, "j d h w (b c) -> (d h w) b (j c)", b=2), rule.kernels(state), atol=1e-5)


def test_stencil_indices_drop_connections_leaving_the_lattice():
    rows, cols, flat = stencil_indices((2, 2, 2), neighbour_offsets())
    assert len(rows) == 8 * 7  # every cell of a 2x2x2 cube sees the 7 others
    assert (rows != cols).all() and (flat // 26 == rows).all()
