"""GEARS-format perturbation data: condition strings, normalisation, DE genes and splits.

Perturbation models (``celltune perturb train``) and the GEARS/scGPT metrics expect data
laid out exactly as GEARS' ``perturb_processed.h5ad`` (see ``shared/docs/perturbation.md``),
so this module reproduces GEARS' conventions without needing the GEARS package.

Public functions (reused by the training / evaluation tasks):

- ``parse_condition(cond) -> tuple[str, ...]``: the perturbed genes of a GEARS condition
  (``"ctrl"`` → ``()``, ``"A+ctrl"`` → ``("A",)``, ``"A+B"`` → ``("A", "B")``).
- ``normalize_conditions(values, control=..., bare_as_single=False)``: map a condition
  column to GEARS spelling or raise an ``InputError`` naming the bad values. Only the
  spelling given as ``control`` is mapped to ``ctrl``; a bare gene ``A`` is mapped to
  ``A+ctrl`` only when ``bare_as_single=True`` (off by default, because a typo such as
  ``control`` would otherwise silently become a perturbation).
- ``add_gears_obs(adata)``: ``dose_val``, ``control``, ``condition_name`` as GEARS.
- ``compute_de_genes(adata)``: ``uns['rank_genes_groups_cov_all']`` (scanpy t-test per
  cell type against ``{cell_type}_ctrl_1``, ``rankby_abs``, all genes) and
  ``top_non_dropout_de_20``, ``top_non_zero_de_20``, ``non_dropout_gene_idx``,
  ``non_zeros_gene_idx`` with GEARS' definitions (non-zero: mean in the condition != 0;
  non-dropout: non-zero or zero in both condition and control).
- ``check_de_agreement(stored, computed)``: condition names whose stored DE lists differ.
- ``split_conditions(conditions, split="simulation", seed=1, ...) -> SplitResult``: GEARS'
  ``simulation``, ``simulation_single``, ``single``, ``combo_seen0/1/2`` (``combo`` is
  ``combo_seen0``) and ``no_test`` splits, drawn with a ``numpy.random.RandomState(seed)``
  (the same stream as GEARS' ``np.random.seed(seed)``, without touching global state).
- ``prepare_perturbation_data(adata, ...) -> AnnData``: all of the above in one call.
- ``load_prepared(path) -> AnnData``: read and validate a prepared or GEARS file.

Layout of the package (every name above is importable from ``celltune.data.gears``):
``conditions`` (condition strings, GEARS ``obs`` columns), ``de`` (DE genes), ``splits``
(GEARS splits), ``prepare`` (``prepare_perturbation_data``, ``load_prepared``, ``write_prepared``).

Perturbed genes absent from the gene list: GEARS keeps such conditions (a model can flag
only genes it knows), so they are kept here too and listed in
``uns['perturbed_genes_missing']``.
"""

from celltune.data.gears.conditions import (
    CTRL,
    add_gears_obs,
    gene_symbols,
    missing_perturbed_genes,
    normalize_conditions,
    parse_condition,
)
from celltune.data.gears.de import DE_KEYS, MIN_CELLS_DE, check_de_agreement, compute_de_genes
from celltune.data.gears.prepare import load_prepared, prepare_perturbation_data, write_prepared
from celltune.data.gears.splits import SPLITS, SplitResult, split_conditions

__all__ = [
    "CTRL",
    "DE_KEYS",
    "MIN_CELLS_DE",
    "SPLITS",
    "SplitResult",
    "add_gears_obs",
    "check_de_agreement",
    "compute_de_genes",
    "gene_symbols",
    "load_prepared",
    "missing_perturbed_genes",
    "normalize_conditions",
    "parse_condition",
    "prepare_perturbation_data",
    "split_conditions",
    "write_prepared",
]
