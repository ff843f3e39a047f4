"""Group rows by key columns and sum counter matrices per group, exactly and in order.

Integers are summed as int64 (exact; a float sum would round past 2**53) and every group's
rows are added in row order, so the same input always gives bit-identical float sums.
Groups are numbered in the order their first row appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Groups:
    first: np.ndarray  # row of each group's first member, groups in first-seen order
    of_row: np.ndarray  # group number of every row

    def __len__(self) -> int:
        return len(self.first)

    def sum(self, matrix: np.ndarray) -> np.ndarray:
        """Per-group column sums of ``matrix`` (rows = the grouped rows)."""
        if len(self.of_row) == 0 or matrix.shape[1] == 0:
            return np.zeros((len(self.first), matrix.shape[1]), matrix.dtype)
        order = np.argsort(self.of_row, kind="stable")  # members of a group stay in row order
        starts = np.flatnonzero(np.diff(self.of_row[order], prepend=-1))
        return np.add.reduceat(matrix[order], starts, axis=0)


def group_rows(keys: pl.DataFrame) -> Groups:
    """Group the rows of ``keys`` (nulls equal to nulls)."""
    if keys.height == 0:
        return Groups(np.zeros(0, np.int64), np.zeros(0, np.int64))
    hashes = keys.hash_rows().to_numpy()
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    if len(first) != keys.n_unique():  # two distinct keys share a 64-bit hash: group exactly instead
        return _group_exactly(keys)
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return Groups(first[order], renumber[inverse.reshape(-1)])


def _group_exactly(keys: pl.DataFrame) -> Groups:
    numbered = keys.with_row_index("__row").group_by(keys.columns, maintain_order=True).agg(pl.col("__row"))
    first = numbered.get_column("__row").list.first().to_numpy().astype(np.int64)
    of_row = np.empty(keys.height, np.int64)
    for group, rows in enumerate(numbered.get_column("__row").to_list()):
        of_row[rows] = group
    return Groups(first, of_row)


__all__ = ["Groups", "group_rows"]
