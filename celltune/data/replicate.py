"""Replicated copies of a data set, for scale tests and memory benchmarks.

:func:`replicate_h5ad` writes a source's rows ``factor`` times into one CSR ``.h5ad``
(cell names get a ``-<replicate>`` suffix, so they stay unique and replicated cells get
their own random draws), chunk by chunk, so memory is that of the source's rows and the
output's ``obs``, never the output matrix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celltune.data.source import StoreSource
from celltune.errors import InputError


def replicate_h5ad(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    factor: int,
    *,
    layer: str | None = None,
    chunk_rows: int = 16384,
    compression: str | None = "gzip",
    uns: bool = False,
) -> Path:
    """Write ``src`` repeated ``factor`` times as a CSR ``.h5ad`` (obs, var and X; ``uns``
    too when asked, e.g. the GEARS DE genes of a prepared perturbation file).
    For scale tests and benchmarks: the output (e.g. 1.2M cells) is written chunk by chunk
    through h5py, so memory is that of the source's rows and the output's ``obs``, never
    the output matrix. Cell names get a ``-<replicate>`` suffix so they stay unique (and
    replicated cells get their own binning draws). Written atomically, gzip-compressed
    (the streaming benchmarks pass ``compression=None``).
    """
    import anndata
    import h5py

    from celltune.files import atomic_path

    if factor < 1:
        raise InputError(f"factor must be >= 1 (got {factor})")
    source = StoreSource(src, layer)
    obs = source.obs_frame()
    var = source.var_frame()
    n, g = source.shape
    names = obs.index.astype(str).to_numpy()
    rep_obs = pd.concat([obs] * factor, ignore_index=True)
    rep_obs.index = pd.Index(
        np.concatenate([names + (f"-{k}" if factor > 1 else "") for k in range(factor)])
    )
    if source.kind == "csr":
        src_ip = np.asarray(source.root[source.element]["indptr"][:], dtype=np.int64)
    else:  # dense: count non-zeros chunk by chunk
        counts = np.concatenate(
            [
                np.diff(source.read_rows(a, min(a + chunk_rows, n)).indptr)
                for a in range(0, n, chunk_rows)
            ]
        )
        src_ip = np.concatenate([[0], np.cumsum(counts)])
    nnz = int(src_ip[-1])
    meta: dict[str, Any] = {}
    if uns and "uns" in source.root:
        from anndata.io import read_elem

        meta = read_elem(source.root["uns"])
    with atomic_path(dst) as tmp:
        anndata.AnnData(obs=rep_obs, var=var, uns=meta).write_h5ad(tmp)
        del rep_obs
        with h5py.File(tmp, "a") as out:
            if "X" in out:
                del out["X"]
            grp = out.create_group("X")
            grp.attrs["encoding-type"] = "csr_matrix"
            grp.attrs["encoding-version"] = "0.1.0"
            grp.attrs["shape"] = np.array([n * factor, g], dtype=np.int64)
            opts: dict[str, Any] = {"compression": compression} if compression else {}
            chunk = (min(max(nnz * factor, 1), 1 << 20),)
            data = grp.create_dataset(
                "data", (nnz * factor,), dtype=np.float32, chunks=chunk, **opts
            )
            indices = grp.create_dataset(
                "indices", (nnz * factor,), dtype=np.int32, chunks=chunk, **opts
            )
            indptr = grp.create_dataset("indptr", (n * factor + 1,), dtype=np.int64)
            indptr[0] = 0
            for a in range(0, n, chunk_rows):
                b = min(a + chunk_rows, n)
                rows = source.read_rows(a, b)
                for k in range(factor):
                    off = k * nnz
                    data[off + src_ip[a] : off + src_ip[b]] = rows.data
                    indices[off + src_ip[a] : off + src_ip[b]] = rows.indices
                    indptr[k * n + a + 1 : k * n + b + 1] = src_ip[a + 1 : b + 1] + off
    source.close()
    return Path(dst)


__all__ = ["replicate_h5ad"]
