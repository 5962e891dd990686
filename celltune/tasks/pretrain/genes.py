"""The run's vocabulary and each file's vocab ids, with the checks that catch wrong genes.

Three sources of a vocabulary, decided once here:

- the union of the files' genes (default; in file order, then column order);
- ``--vocab vocab.json``: fixed; genes outside it are dropped;
- ``--init MODEL_DIR``: the model's vocabulary, *extended* by the files' genes that it
  lacks (appended after its largest id, so every id of the published model keeps its
  meaning and its trained embedding row) or, with ``--keep-vocab``, kept as it is.

A vocabulary is never shrunk: dropping tokens would renumber ids and break the model's
embedding table for every tool that reads its ``vocab.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from celltune.errors import InputError

logger = logging.getLogger("celltune.tasks.pretrain")

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")


@dataclass
class FileGenes:
    """One file's gene names and the vocab id of each of its columns (-1: dropped)."""

    name: str
    genes: list[str]
    gene_ids: np.ndarray

    @property
    def n_used(self) -> int:
        """Columns that are in the vocabulary."""
        return int((self.gene_ids >= 0).sum())


def name_kind(names: Sequence[str]) -> str:
    """'Ensembl IDs' or 'gene symbols', by what most of ``names`` look like."""
    names = [str(n) for n in names if not str(n).startswith("<")]
    if not names:
        return "no genes"
    ens = sum(bool(_ENSEMBL.match(n)) for n in names)
    return "Ensembl IDs" if ens * 2 > len(names) else "gene symbols"


def _examples(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(str(n) for n in list(names)[:k])


def check_overlap(files: dict[str, list[str]], min_overlap: float) -> None:
    """Refuse a file that shares (almost) no genes with the others; log union/overlap."""
    if len(files) < 2:
        return
    sets = {k: set(v) for k, v in files.items()}
    union = set().union(*sets.values())
    common = set.intersection(*sets.values())
    logger.info(
        "%d files: %s genes in their union, %s in every file",
        len(files),
        f"{len(union):,}",
        f"{len(common):,}",
    )
    for name, own in sets.items():
        others = set().union(*(s for k, s in sets.items() if k != name))
        shared = len(own & others)
        if shared >= min_overlap * min(len(own), len(others)):
            continue
        other_genes = sorted(others)
        raise InputError(
            f"{name} shares {shared:,} of its {len(own):,} genes with the other files "
            f"(union {len(union):,} genes, in every file {len(common):,}); its names look "
            f"like {name_kind(files[name])} (e.g. {_examples(files[name])}), the others' "
            f"like {name_kind(other_genes)} (e.g. {_examples(other_genes)}): use one "
            "naming (and species) in every file, or --set pretrain.min_gene_overlap=0 to "
            "pretrain on them anyway"
        )


def check_match(name: str, genes: list[str], vocab: Any, what: str, minimum: float) -> np.ndarray:
    """Vocab ids of ``genes``; refuse a file of which less than ``minimum`` matches."""
    t2i = vocab.token_to_id  # a copy: taken once
    ids = np.asarray([t2i.get(g, -1) for g in genes], dtype=np.int64)
    n = int((ids >= 0).sum())
    if n >= minimum * len(genes) and n > 0:
        logger.info("%s: %s of %s genes in the vocabulary", name, f"{n:,}", f"{len(genes):,}")
        return ids
    vocab_genes = [t for t in t2i if not t.startswith("<")]
    lower = {t.lower() for t in vocab_genes}
    n_case = sum(g.lower() in lower for g in genes)
    hint = (
        f"; {n_case:,} match when letter case is ignored (human symbols are upper case, "
        "mouse ones capitalised)"
        if n_case > 2 * n
        else ""
    )
    pct = 100 * n / max(len(genes), 1)
    kind, vkind = name_kind(genes), name_kind(vocab_genes)
    why = (
        f"the file's names look like {kind} (e.g. {_examples(genes)}), the vocabulary's "
        f"like {vkind} (e.g. {_examples(vocab_genes)})"
    )
    if kind == vkind and not hint:
        why = (
            f"both look like {kind} (e.g. {_examples(genes)} / {_examples(vocab_genes)}), so "
            "the file mostly holds genes the vocabulary lacks (another panel or species?)"
        )
    raise InputError(
        f"{what} matches {n:,} of the {len(genes):,} genes of {name} ({pct:.1f}%, "
        f"need {100 * minimum:.0f}%): {why}{hint}; use the naming of the vocabulary (e.g. "
        "--set data.gene_column=COLUMN for a var column of symbols), or "
        "--set pretrain.min_vocab_match=0 to go on"
    )


def extend_vocab(vocab: Any, genes: Sequence[str]) -> Any:
    """``vocab`` plus the ``genes`` it lacks, appended after its largest id."""
    from celltune.data.vocab import GeneVocab

    mapping = dict(vocab.token_to_id)
    next_id = max(mapping.values()) + 1
    for g in genes:
        if g not in mapping:
            mapping[g] = next_id
            next_id += 1
    return GeneVocab(mapping)


def build_vocab(
    files: dict[str, list[str]], pcfg: Any, init_vocab: Any | None, init: str | None = None
) -> tuple[Any, list[FileGenes]]:
    """The run's vocabulary and every file's vocab ids (see the module docstring)."""
    from celltune.data.vocab import GeneVocab

    check_overlap(files, pcfg.min_gene_overlap)
    all_genes = [g for genes in files.values() for g in genes]
    what = "the vocabulary"
    strict = True
    if pcfg.vocab:
        vocab, what = GeneVocab.from_file(pcfg.vocab), f"--vocab {pcfg.vocab}"
    elif init_vocab is not None and not pcfg.extend_vocab:
        vocab, what = init_vocab, f"the vocabulary of --init {init} (--keep-vocab)"
    elif init_vocab is not None:
        known = init_vocab.token_to_id
        for name, genes in files.items():  # how many genes start from trained embeddings
            n = sum(g in known for g in genes)
            logger.info("%s: %s of %s genes in the --init vocabulary", name, n, len(genes))
        vocab = extend_vocab(init_vocab, all_genes)
        added = vocab.ntoken - init_vocab.ntoken
        logger.info("vocabulary: %d tokens (%d added to --init's)", vocab.ntoken, added)
        strict = False
    else:
        vocab = GeneVocab.from_genes(all_genes)
        strict = False
    out = []
    for name, genes in files.items():
        minimum = pcfg.min_vocab_match if strict else 0.0
        out.append(FileGenes(name, genes, check_match(name, genes, vocab, what, minimum)))
    return vocab, out


__all__ = ["FileGenes", "build_vocab", "check_match", "check_overlap", "extend_vocab", "name_kind"]
