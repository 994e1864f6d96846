"""Products with a sparse ``(d_out, d_in)`` matrix whose non-zeros sit at a fixed list of flat indices, shared by SET
(``safety/layer.py``: the deltas) and masked LoRA (``safety_lora/variant.py``: what LoRA adds at the masked entries).

An `EntryPattern` is built once per layer and mask from the sorted flat indices ``i * d_in + j`` and cached by the
layer; each step then only brings new values. With ``values`` one number per entry (in the pattern's row-major order)
and the matrix ``D`` they describe, three products cover a forward and a backward pass without any weight-sized
tensor, each O(nnz * m) for an ``m``-column operand:

| method | computes | used for |
|---|---|---|
| `EntryPattern.rows_product` | ``D @ table``: row ``i`` is ``sum_k values[k] * table[j_k]`` over the entries of row ``i`` | ``(x Dᵀ)ᵀ`` with ``table = xᵀ`` |
| `EntryPattern.cols_product` | ``Dᵀ @ table``: row ``j`` is ``sum_k values[k] * table[i_k]`` over the entries of column ``j`` | ``(g D)ᵀ`` with ``table = gᵀ`` |
| `EntryPattern.sample` | ``(left @ rightᵀ)`` at the entries only (SDDMM) | the value gradient ``(gᵀ x)[i_k, j_k]`` |

The two products are ``torch.nn.functional.embedding_bag`` calls in ``"sum"`` mode with per-sample weights: the
entries grouped by row (by column for ``cols_product``) are the bags, the gathered rows of ``table`` the embeddings.
That kernel streams contiguous rows of ``table`` (the token axis, for ``table = xᵀ``), where a CSR ``torch.sparse.mm``
gathers strided columns; ``sample`` uses ``torch.sparse.sampled_addmm`` where the kernel exists (fp32/fp64) and a
chunked gather with fp32 accumulation elsewhere. Measurements: ``benchmarks/masked_lora.py`` and
``benchmarks/set_adapter.py`` (tables in ``docs/tuner.md``).

Nothing here validates indices: the layers pass buffers already checked by ``_layout.check_indices`` (1-D, sorted,
unique, inside the weight).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["EntryPattern", "compute_dtype"]

# Working-set bound of the gather fallback of `EntryPattern.sample`, in elements of each gathered operand (16 MiB fp32).
_GATHER_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the sparse products run in: float64 if any operand is float64, else float32 (half-precision operands
    are upcast, so that a small update is rounded relative to itself and sums accumulate in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class EntryPattern:
    """The fixed sparsity structure of a ``(d_out, d_in)`` matrix with non-zeros at sorted flat indices.

    Args:
        flat_indices: 1-D, sorted, unique integer tensor of flat positions ``i * d_in + j``.
        out_features: ``d_out``.
        in_features: ``d_in``.

    Attributes:
        flat: the int64 flat indices.
        rows, cols: int64 row and column of every entry, in flat (row-major) order.
        perm_t: the permutation that puts the entries in column-major order (for ``Dᵀ``).
        nnz: the number of entries.
    """

    def __init__(self, flat_indices: torch.Tensor, out_features: int, in_features: int) -> None:
        flat = flat_indices.to(torch.int64)
        self.shape = (int(out_features), int(in_features))
        self.nnz = int(flat.numel())
        self.flat = flat
        self.rows = torch.div(flat, in_features, rounding_mode="floor")
        self.cols = flat - self.rows * in_features
        self.crow = _offsets(self.rows, out_features)
        self.perm_t = torch.argsort(self.cols * out_features + self.rows)
        self.rows_t = self.rows[self.perm_t]
        self.offsets_t = _offsets(self.cols, in_features)[:-1]
        self._patterns: dict[torch.dtype, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def rows_product(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``D @ table`` as a dense ``(d_out, m)`` tensor, for ``table`` of shape ``(d_in, m)`` (rows contiguous)."""
        return F.embedding_bag(self.cols, table, self.crow[:-1], mode="sum", per_sample_weights=values)

    def cols_product(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``Dᵀ @ table`` as a dense ``(d_in, m)`` tensor, for ``table`` of shape ``(d_out, m)``; ``values`` are in
        ``D``'s (row-major) order."""
        return F.embedding_bag(self.rows_t, table, self.offsets_t, mode="sum", per_sample_weights=values[self.perm_t])

    def sample(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``g[k] = <left[i_k], right[j_k]>`` for every entry: the entries of ``left @ rightᵀ`` without the product.

        Args:
            left: ``(d_out, m)``.
            right: ``(d_in, m)``.

        Returns:
            A 1-D tensor of ``nnz`` values in flat order, in ``compute_dtype`` of the operands (fp32 for half precision).
        """
        if left.dtype in (torch.float32, torch.float64) and right.dtype == left.dtype:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    return torch.sparse.sampled_addmm(self._csr(left.dtype), left, right.t(), beta=0.0).values()
            except (RuntimeError, NotImplementedError):  # no kernel for this device: use the gather path
                pass
        return self._gather_sample(left, right)

    def _csr(self, dtype: torch.dtype) -> torch.Tensor:
        pattern = self._patterns.get(dtype)
        if pattern is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                zeros = torch.zeros(self.nnz, dtype=dtype, device=self.device)
                pattern = torch.sparse_csr_tensor(self.crow, self.cols, zeros, self.shape, check_invariants=False)
            self._patterns[dtype] = pattern
        return pattern

    def _gather_sample(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        width = max(1, left.shape[1])
        chunk = max(1, _GATHER_CHUNK_ELEMENTS // width)
        dtype = compute_dtype(left.dtype, right.dtype)
        out = torch.empty(self.nnz, dtype=dtype, device=left.device)
        for start in range(0, self.nnz, chunk):
            stop = min(start + chunk, self.nnz)
            a = left.index_select(0, self.rows[start:stop]).to(dtype)
            b = right.index_select(0, self.cols[start:stop]).to(dtype)
            # bmm of (k, 1, m) x (k, m, 1): one dot product per entry, accumulated in fp32 (fp64 for fp64)
            out[start:stop] = torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
        return out


def _offsets(major: torch.Tensor, size: int) -> torch.Tensor:
    """CSR row pointers (``size + 1`` values) of entries sorted by ``major``."""
    crow = torch.zeros(size + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.bincount(major, minlength=size).cumsum(0)
    return crow
