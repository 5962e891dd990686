"""The SPEC §1 preprocessing pipeline: filter → normalise → log1p → HVG → per-cell binning.

Everything stays CSR so memory scales with the number of non-zeros. Bad input is caught
before any work is done: non-integer "counts" (scGPT #345) and re-normalising data that is
already log-transformed (scGPT #174) are errors unless ``data_is_raw=False``.

``data_is_raw=False`` means the chosen matrix is already normalised and log-transformed:
``normalize_total``/``log1p`` are skipped, no ``counts`` layer is written (there are no raw
counts to keep), and HVGs use ``cell_ranger`` (``seurat_v3`` needs counts).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from celltune.data import io
from celltune.data.binning import bin_matrix, cell_keys
from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

HVG_FLAVORS = ("seurat_v3", "cell_ranger", "seurat")
#: Smaller batches make per-batch HVG statistics undefined (and crash skmisc's loess).
MIN_CELLS_PER_BATCH = 2


@dataclass
class PreprocessConfig:
    """Options of :func:`preprocess`; defaults are SPEC §1's (scGPT integration set-up).

    ``n_hvg=None`` (or 0) keeps all genes. ``hvg_flavor=None`` picks ``seurat_v3`` on raw
    counts and ``cell_ranger`` otherwise.
    """

    layer: str | None = None
    data_is_raw: bool = True
    filter_gene_by_counts: int | None = 3
    filter_cell_by_counts: int | None = None
    normalize_total: float | None = 1e4
    log1p: bool = True
    n_hvg: int | None = 1200
    hvg_flavor: str | None = None
    batch_key: str | None = None
    n_bins: int = 51
    seed: int = 0

    @classmethod
    def field_names(cls) -> list[str]:
        """Names accepted as overrides / YAML keys."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides: Any) -> PreprocessConfig:
        """A copy with ``overrides`` applied; unknown names are an error listing valid ones."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise InputError(
                f"unknown preprocess option(s) {', '.join(unknown)}; valid options: "
                f"{', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        """Reject impossible settings before touching the data."""
        if self.n_bins < 2:
            raise InputError(f"n_bins must be at least 2 (got {self.n_bins}); default 51")
        if self.n_hvg is not None and self.n_hvg < 0:
            raise InputError(f"n_hvg must be positive (got {self.n_hvg}); 0 keeps all genes")
        if self.hvg_flavor is not None and self.hvg_flavor not in HVG_FLAVORS:
            raise InputError(
                f"unknown hvg_flavor {self.hvg_flavor!r}; use one of {', '.join(HVG_FLAVORS)} "
                "or leave it unset (auto)"
            )
        if self.hvg_flavor == "seurat_v3" and not self.data_is_raw:
            raise InputError(
                "hvg_flavor 'seurat_v3' needs raw counts but data_is_raw=False; use "
                "'cell_ranger' or 'seurat' (or leave hvg_flavor unset)"
            )
        if self.normalize_total is not None and self.normalize_total <= 0:
            raise InputError(f"normalize_total must be > 0 (got {self.normalize_total})")


def _as_csr_float32(X: Any) -> sp.csr_matrix:
    """A CSR float32 copy (never densifies sparse input; dense input is sparsified)."""
    if sp.issparse(X):
        M = X.tocsr(copy=True) if X.format != "csr" else X.copy()
    else:
        M = sp.csr_matrix(np.asarray(X))
    if M.dtype != np.float32:
        M = M.astype(np.float32)
    M.sum_duplicates()
    M.eliminate_zeros()
    return M


def _looks_normalised_log(X: Any) -> bool:
    """Non-integer values that never exceed 30: log-normalised data SPEC's rule can miss.

    SPEC's rule needs a non-zero value < 1, which log1p(1e4 * x / n) only produces for
    cells with more than ~5,800 counts; gene-subset files (e.g. Kang) have none.
    """
    v = X.data if sp.issparse(X) else np.asarray(X).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() < 0 or v.max() > io.LOG_MAX:
        return False
    return bool((v != np.floor(v)).any())


def _check_input(X: Any, cfg: PreprocessConfig, where: str) -> None:
    """Raw-count / log-transform checks (SPEC §1 step 4 and issue 2's bad-input list)."""
    if cfg.data_is_raw:
        if io.looks_log_transformed(X) or _looks_normalised_log(X):
            v = X.data if sp.issparse(X) else np.asarray(X)
            nz = v[(v != 0) & np.isfinite(v)]
            raise InputError(
                f"{where} looks already log-transformed (max {float(nz.max()):.3g}, smallest "
                f"non-zero {float(nz.min()):.3g}); normalising it again would be wrong. "
                f"{io.NOT_RAW_HINT[0].upper()}{io.NOT_RAW_HINT[1:]}, or select raw counts "
                "with --layer"
            )
        io.check_raw_counts(X, where)
    else:
        io.check_finite_nonnegative(X, where)
        if not (io.looks_log_transformed(X) or _looks_normalised_log(X)):
            logger.warning(
                "%s does not look log-transformed (max > 30 or no value below 1) although "
                "data_is_raw=False; if these are raw counts drop --not-raw",
                where,
            )


def _check_batch_sizes(ad: AnnData, batch_key: str, min_cells: int = MIN_CELLS_PER_BATCH) -> None:
    """Per-batch HVG statistics need >= 2 cells; a 1-cell batch crashes skmisc's loess."""
    sizes = ad.obs[batch_key].astype(str).value_counts()
    small = sizes[sizes < min_cells]
    if len(small):
        listing = ", ".join(f"{k!r} ({v} cell{'s' if v != 1 else ''})" for k, v in small.items())
        raise InputError(
            f"batch-aware HVG selection needs at least {min_cells} cells per batch; too small "
            f"in obs[{batch_key!r}]: {listing}. Merge or drop those cells, or omit --batch-key"
        )


def _select_hvg(ad: AnnData, cfg: PreprocessConfig, flavor: str, n_hvg: int) -> np.ndarray:
    """Boolean HVG mask via scanpy; seurat_v3 reads the raw ``counts`` layer."""
    import scanpy as sc

    kwargs: dict[str, Any] = {"n_top_genes": n_hvg, "flavor": flavor, "inplace": False}
    if cfg.batch_key is not None:
        kwargs["batch_key"] = cfg.batch_key
    if flavor == "seurat_v3":
        kwargs["layer"] = "counts"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            df = sc.pp.highly_variable_genes(ad, **kwargs)
    except ImportError as err:
        raise InputError(
            f"hvg_flavor {flavor!r} needs the scikit-misc package: pip install scikit-misc "
            "(or choose hvg_flavor='cell_ranger')"
        ) from err
    except (ValueError, ZeroDivisionError) as err:
        hint = (
            " (a batch may have too few cells or genes: merge small batches or drop --batch-key)"
            if cfg.batch_key
            else ""
        )
        raise InputError(
            f"highly-variable gene selection ({flavor}) failed: {err}{hint}; try "
            "hvg_flavor='cell_ranger' or a smaller n_hvg"
        ) from err
    mask = np.asarray(df["highly_variable"], dtype=bool)
    return mask


def _working_copy(adata: AnnData, cfg: PreprocessConfig) -> AnnData:
    """A new AnnData with the input matrix (``X`` or ``cfg.layer``) as float32 CSR, after the
    input checks; obs, var, obsm and uns (minus any earlier ``uns['celltune']``) copied."""
    import anndata

    where = "X" if cfg.layer is None else f"layer {cfg.layer!r}"
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"the dataset is empty ({adata.n_obs:,} cells × {adata.n_vars:,} genes); "
            "check the input file or the subset you passed"
        )
    if cfg.batch_key is not None:
        io.require_obs_column(adata, cfg.batch_key, "batch-aware HVG selection (--batch-key)")
    X_in = io.get_matrix(adata, cfg.layer)
    if hasattr(X_in, "to_memory"):  # backed sparse dataset
        X_in = X_in.to_memory()
    _check_input(X_in, cfg, where)
    return anndata.AnnData(
        X=_as_csr_float32(X_in),
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm={k: v for k, v in adata.obsm.items()},
        uns={k: v for k, v in adata.uns.items() if k != "celltune"},
    )


def _filter(ad: AnnData, cfg: PreprocessConfig) -> None:
    """Gene then cell count filters, in place; an empty result is an error."""
    import scanpy as sc

    if cfg.filter_gene_by_counts:
        sc.pp.filter_genes(ad, min_counts=cfg.filter_gene_by_counts)
    if cfg.filter_cell_by_counts:
        sc.pp.filter_cells(ad, min_counts=cfg.filter_cell_by_counts)
    if ad.n_obs == 0 or ad.n_vars == 0:
        raise InputError(
            f"no data left after filtering ({ad.n_obs:,} cells × {ad.n_vars:,} genes, "
            f"filter_gene_by_counts={cfg.filter_gene_by_counts}, filter_cell_by_counts="
            f"{cfg.filter_cell_by_counts}); lower the filter thresholds"
        )


def _normalize(ad: AnnData, cfg: PreprocessConfig) -> None:
    """Raw counts kept in ``layers['counts']``, then normalize_total and log1p, in place
    (only for raw input)."""
    import scanpy as sc

    if cfg.data_is_raw:
        ad.layers["counts"] = ad.X.copy()
        if cfg.normalize_total:
            sc.pp.normalize_total(ad, target_sum=cfg.normalize_total)
        if cfg.log1p:
            sc.pp.log1p(ad)
            ad.uns.pop("log1p", None)  # scanpy's marker; our uns record says it instead


def _hvg_subset(ad: AnnData, cfg: PreprocessConfig, n_hvg: int) -> tuple[AnnData, str]:
    """(``ad`` restricted to its ``n_hvg`` HVGs, the flavor used); all genes and "none"
    with ``n_hvg`` 0."""
    flavor = cfg.hvg_flavor or ("seurat_v3" if cfg.data_is_raw else "cell_ranger")
    if n_hvg and ad.n_obs < MIN_CELLS_PER_BATCH:
        raise InputError(
            f"highly-variable gene selection needs at least {MIN_CELLS_PER_BATCH} cells "
            f"(got {ad.n_obs}); pass more cells or --n-hvg 0 to keep all genes"
        )
    if n_hvg and cfg.batch_key is not None:
        _check_batch_sizes(ad, cfg.batch_key)
    if n_hvg:
        ad = ad[:, _select_hvg(ad, cfg, flavor, n_hvg)].copy()
    else:
        flavor = "none"
    ad.var["highly_variable"] = True
    return ad, flavor


def preprocess(
    adata: AnnData,
    config: PreprocessConfig | None = None,
    *,
    quiet: bool = True,
    **overrides: Any,
) -> AnnData:
    """Run SPEC §1 on ``adata`` and return a new AnnData restricted to the HVGs.

    Result: ``X`` = ``layers['X_normed']`` (normalised + log1p), ``layers['counts']`` (raw,
    only when ``data_is_raw``), ``layers['X_binned']`` (float32 bins 0..n_bins-1),
    ``var['highly_variable']``, and the parameters used in ``uns['celltune']['preprocess']``.
    The input object is not modified.
    """
    t0 = time.perf_counter()
    cfg = (config or PreprocessConfig()).replace(**overrides)
    cfg.validate()
    ad = _working_copy(adata, cfg)
    n_cells_in, n_genes_in = ad.shape

    _filter(ad, cfg)
    n_genes_filtered = ad.n_vars
    n_hvg = cfg.n_hvg or 0
    if n_hvg > ad.n_vars:
        raise InputError(
            f"n_hvg={n_hvg:,} but only {ad.n_vars:,} genes are left after filtering "
            f"(of {n_genes_in:,}); use --n-hvg {ad.n_vars} or less, or --n-hvg 0 to keep "
            "all genes"
        )
    _normalize(ad, cfg)
    ad, flavor = _hvg_subset(ad, cfg, n_hvg)

    if not sp.isspmatrix_csr(ad.X):
        ad.X = sp.csr_matrix(ad.X)
    ad.layers["X_normed"] = ad.X
    keys = cell_keys(ad.obs_names)
    ad.layers["X_binned"] = bin_matrix(ad.X, cfg.n_bins, cfg.seed, keys, quiet=quiet)

    params = dataclasses.asdict(cfg)
    params.update(
        hvg_flavor_used=flavor,
        n_cells_in=n_cells_in,
        n_genes_in=n_genes_in,
        n_genes_after_filter=n_genes_filtered,
        n_cells=ad.n_obs,
        n_genes=ad.n_vars,
        binned_layer="X_binned",
        normed_layer="X_normed",
        counts_layer="counts" if cfg.data_is_raw else None,
    )
    ad.uns["celltune"] = {"preprocess": params}
    logger.info(
        "preprocessed %s cells: %s → %s genes after filtering → %s HVGs (%s), %d bins in %.1f s",
        f"{ad.n_obs:,}",
        f"{n_genes_in:,}",
        f"{n_genes_filtered:,}",
        f"{ad.n_vars:,}",
        flavor,
        cfg.n_bins,
        time.perf_counter() - t0,
    )
    return ad
