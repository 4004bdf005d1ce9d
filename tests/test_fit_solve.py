"""The fit's solve from A's upper triangle alone (what the per-expert solve stores) against numpy's."""

import numpy as np
import pytest
import torch

from uncurl.fit import solve


@pytest.mark.parametrize("definite", [True, False])  # Cholesky, and the LU fallback where A + r I is not definite
def test_solve_from_the_upper_triangle_equals_numpy(definite):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = m @ m.T if definite else m + m.T
    c = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    r = 1e-3 * float(a.diagonal().mean())
    want = np.linalg.solve(a.numpy() + r * np.eye(40), c.numpy())
    assert bool(torch.linalg.cholesky_ex(a + r * torch.eye(40, dtype=torch.float64))[1] == 0) == definite
    upper = a.triu() + torch.tril(torch.full_like(a, 1e6), -1)  # what lies below the diagonal is never read
    got = solve(upper, c, 1e-3, inplace=True, upper=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9 * np.abs(want).max())
