"""Gene vocabulary in scGPT's ``vocab.json`` format (``{token: id}``), SPEC §2.

Pretrained scGPT models index their gene embedding by these ids, so reading the file
exactly (ids as stored, not re-numbered) is what makes a checkpoint usable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltune.errors import InputError
from celltune.files import write_json_atomic

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)


@dataclass(frozen=True)
class GeneMatch:
    """Result of :meth:`GeneVocab.match_genes`: one vocab id per gene (-1 = not in vocab)."""

    ids: np.ndarray
    matched: np.ndarray
    n_matched: int
    n_total: int

    def summary(self) -> str:
        """The human-readable line, e.g. "matched 3,012/3,346 genes"."""
        return f"matched {self.n_matched:,}/{self.n_total:,} genes"


class GeneVocab:
    """Mapping gene symbol / special token → integer id; specials appended when missing."""

    pad_token = PAD_TOKEN
    cls_token = CLS_TOKEN
    eoc_token = EOC_TOKEN

    def __init__(self, token_to_id: dict[str, int], *, add_specials: bool = True) -> None:
        mapping: dict[str, int] = {}
        seen: dict[int, str] = {}
        for tok, idx in token_to_id.items():
            if not isinstance(tok, str) or isinstance(idx, bool) or not isinstance(idx, int):
                raise InputError(
                    f"vocabulary entry {tok!r}: {idx!r} is not a token → integer id pair; a "
                    "vocab.json maps gene symbols to integer ids"
                )
            if idx < 0:
                raise InputError(f"vocabulary id for {tok!r} is negative ({idx}); ids are >= 0")
            if idx in seen:
                raise InputError(
                    f"vocabulary ids must be unique: {tok!r} and {seen[idx]!r} both have id "
                    f"{idx}; fix the vocab.json"
                )
            seen[idx] = tok
            mapping[tok] = idx
        if add_specials:
            next_id = max(seen, default=-1) + 1
            for tok in SPECIAL_TOKENS:
                if tok not in mapping:
                    mapping[tok] = next_id
                    seen[next_id] = tok
                    next_id += 1
        self._t2i = mapping
        self._i2t = seen

    # -- construction / IO -------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Read a scGPT ``vocab.json``."""
        p = Path(path)
        if p.is_dir():
            p = p / "vocab.json"
        if not p.is_file():
            raise InputError(f"vocabulary file not found: {p}; give the path to a vocab.json")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{p} is not valid JSON ({err}); expected {{token: id}}") from err
        if not isinstance(obj, dict):
            raise InputError(
                f"{p} holds a JSON {type(obj).__name__}, expected an object {{token: id}} "
                "(scGPT vocab.json format)"
            )
        return cls(obj)

    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> GeneVocab:
        """Ids 0..n-1 in the given order (duplicates kept once), then the special tokens."""
        mapping: dict[str, int] = {}
        for g in genes:
            g = str(g)
            if g not in mapping and g not in SPECIAL_TOKENS:
                mapping[g] = len(mapping)
        if not mapping:
            raise InputError("cannot build a vocabulary from an empty gene list")
        return cls(mapping)

    def to_file(self, path: str | os.PathLike[str]) -> None:
        """Write ``{token: id}`` in id order (atomic), readable by scGPT."""
        ordered = {self._i2t[i]: i for i in sorted(self._i2t)}
        write_json_atomic(path, ordered, indent=2)

    # -- mapping protocol -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._t2i)

    def __contains__(self, token: object) -> bool:
        return token in self._t2i

    def __getitem__(self, token: str) -> int:
        try:
            return self._t2i[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._t2i)

    def __repr__(self) -> str:
        return f"GeneVocab({len(self):,} tokens, pad_id={self.pad_id})"

    @property
    def token_to_id(self) -> dict[str, int]:
        """A copy of the ``{token: id}`` mapping."""
        return dict(self._t2i)

    def id_to_token(self, i: int) -> str:
        """The token with id ``i`` (``KeyError`` when no token has it)."""
        try:
            return self._i2t[int(i)]
        except KeyError:
            raise KeyError(f"no token has id {i}") from None

    @property
    def pad_id(self) -> int:
        return self._t2i[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self._t2i[CLS_TOKEN]

    @property
    def eoc_id(self) -> int:
        return self._t2i[EOC_TOKEN]

    @property
    def ntoken(self) -> int:
        """Embedding table size: max id + 1 (ids need not be contiguous)."""
        return max(self._i2t) + 1

    # -- matching -------------------------------------------------------------------------
    def match_genes(self, genes: Iterable[str]) -> GeneMatch:
        """Vocab id per gene (-1 when absent; special tokens never match a gene)."""
        genes = [str(g) for g in genes]
        ids = np.fromiter(
            (self._t2i.get(g, -1) if g not in SPECIAL_TOKENS else -1 for g in genes),
            dtype=np.int64,
            count=len(genes),
        )
        matched = ids >= 0
        res = GeneMatch(ids, matched, int(matched.sum()), len(genes))
        if res.n_matched == 0:
            example_vocab = [t for t in list(self._t2i)[:5] if t not in SPECIAL_TOKENS]
            raise InputError(
                f"none of the {len(genes):,} genes matched the vocabulary (data genes look "
                f"like {genes[:3]}, vocabulary like {example_vocab}); use gene symbols as "
                "var_names (e.g. adata.var_names = adata.var['gene_name']) or the vocab.json "
                "of the model you fine-tune"
            )
        logger.info("%s", res.summary())
        return res
