"""``celltune perturb evaluate`` as a Python function: predict every test perturbation,
score it and every baseline with the GEARS / scGPT metrics, plot and report.

It lives in the report layer because it combines the trained model
(``celltune.tasks.perturbation``) with ``celltune.eval`` and ``celltune.report``, which sit to
the right of ``tasks`` (docs/ARCHITECTURE.md). The CLI command is a thin wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: columns of the README / report table, in this order
TABLE_METRICS = (
    "pearson",
    "pearson_de",
    "pearson_delta",
    "pearson_de_delta",
    "pearson_delta_centered",
    "mse",
    "mse_de",
    "pearson_delta_top20_de_non_dropout",
    "frac_correct_direction_top20_de_non_dropout",
    # metrics a mean predictor cannot game (celltune.eval.perturbation_discrimination)
    "discrimination_l1",
    "de_overlap_at_20",
    "de_direction_agreement",
    "mae",
    "pearson_delta_pert_mean",
)
MODEL_NAME = "celltune"


EVALUATE = "perturb evaluate"
#: what an evaluation writes into the run directory (removed before the next one)
EVAL_FILES = ("metrics.json", "metrics_*.csv", "perturbation_*.png", "report.html")


def evaluate_perturbation_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    n_ctrl: int | None = None,
    n_plots: int = 4,
    device: str = "cpu",
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The ``evaluate`` command as a function; returns the content of ``metrics.json``.

    Predicts every test perturbation the model can flag, scores it and every baseline
    with the GEARS / scGPT metrics, per perturbation and per subgroup, in two scopes:
    ``model`` (the test perturbations the model can represent: every method on the same
    set) and ``all`` (every test perturbation: baselines only). Writes ``metrics.json``,
    ``metrics_summary.csv``, ``metrics_per_perturbation.csv``, PNGs and ``report.html``.
    An evaluation on another data file than the one already in ``run_dir`` is refused
    unless ``overwrite`` (then the old one's files are removed first: no mixed plots).
    """
    import contextlib

    from celltune.files import RunLock

    # a train or another evaluate into the same directory is refused; a missing directory
    # is named by load_run (no lock directory is made for it)
    with RunLock(run_dir) if Path(run_dir).is_dir() else contextlib.nullcontext():
        return _evaluate(Path(run_dir), data, n_ctrl, n_plots, device, quiet, overwrite)


def _evaluate(
    out: Path,
    data: str | Path | None,
    n_ctrl: int | None,
    n_plots: int,
    device: str,
    quiet: bool,
    overwrite: bool,
) -> dict[str, Any]:
    """:func:`evaluate_perturbation_run` under the run directory's lock."""
    import time

    from celltune.eval.perturbation import eval_inputs_from_adata
    from celltune.eval.perturbation_baselines import BASELINES, PerturbationBaselines
    from celltune.files import claim_outputs, input_record, write_json_atomic, write_manifest
    from celltune.tasks.perturbation import load_run

    t0 = time.perf_counter()
    run = load_run(out, device=device)
    data_path, adata = _load_data(run, out, data)
    record = input_record(data=data_path)
    claim_outputs(
        out, EVALUATE, record, overwrite=overwrite, marker="metrics.json", patterns=EVAL_FILES
    )
    inputs = eval_inputs_from_adata(adata)
    sets = _test_sets(list(inputs["true_cells"]), run)
    n, model_pred = _predict_model(run, sets["placeable"], n_ctrl, quiet)
    baselines = PerturbationBaselines(adata, seed=run.config.train.seed)
    base_pred = baselines.predict_all(sets["test"], BASELINES)

    scopes: dict[str, dict[str, Any]] = {}
    seed = run.config.train.seed
    if sets["measured"]:
        scopes["measured"] = _score(
            sets["measured"], {MODEL_NAME: model_pred, **base_pred}, inputs, seed
        )
    everything = dict(base_pred)
    if not sets["excluded"]:
        everything = {MODEL_NAME: model_pred, **everything}
    scopes["all"] = _score(sets["test"], everything, inputs, seed)
    table = _write_tables(scopes, out)
    images, captions = _plots(adata, inputs, sets, model_pred, base_pred, out, n_plots)

    metrics = _metrics(run, out, data_path, sets, n, scopes)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "metrics.json", metrics)
    _write_html(run, out, sets, n, scopes, table, images, captions)
    written = [out / "metrics.json", out / "report.html", *images]
    written += [out / "metrics_per_perturbation.csv", out / "metrics_summary.csv"]
    write_manifest(out, EVALUATE, record, written)
    logger.info("wrote %s (%.0f s)", out / "report.html", time.perf_counter() - t0)
    return metrics


def _load_data(run: Any, out: Path, data: str | Path | None) -> tuple[Path, Any]:
    """The prepared data the run was trained on, restricted to the model's genes."""
    from celltune.data.gears import load_prepared
    from celltune.errors import InputError

    data_path = Path(data) if data is not None else Path(run.info["data"])
    if not data_path.is_file():
        raise InputError(
            f"the training data {data_path} recorded in {out / 'run.json'} is not there; "
            "pass it with --data"
        )
    adata = load_prepared(data_path)
    symbols = adata.var["gene_name"].astype(str).to_numpy()
    if list(symbols) != list(run.genes):
        # a pretrained vocabulary dropped genes: score every method on the model's genes
        keep = np.isin(symbols, run.genes)
        adata = adata[:, keep].copy()
        logger.info("evaluating on the %d genes of the model (of %d)", keep.sum(), keep.size)
    return data_path, adata


def _test_sets(test: list[str], run: Any) -> dict[str, list[str]]:
    """Test perturbations by what the model can do with them.

    measured: every perturbed gene is an input gene (flag on a measured value);
    placeable: every gene is at least in the vocabulary (extra flagged token);
    untrained: placeable, but with an unmeasured gene never perturbed in training.
    """
    measured_genes = set(run.genes)
    vocab = run.model.vocab
    measured = [c for c in test if all(g in measured_genes for g in _genes_of(c))]
    placeable = [c for c in test if all(g in measured_genes or g in vocab for g in _genes_of(c))]
    untrained = [
        c
        for c in placeable
        if any(g not in measured_genes and g not in run.trained_genes for g in _genes_of(c))
    ]
    if not placeable:
        logger.warning(
            "none of the %d test perturbations has its genes in the model's gene list; only "
            "the baselines are scored",
            len(test),
        )
    return {
        "test": test,
        "measured": measured,
        "placeable": placeable,
        "excluded": [c for c in test if c not in placeable],
        "untrained": untrained,
    }


def _predict_model(
    run: Any, placeable: list[str], n_ctrl: int | None, quiet: bool
) -> tuple[int, dict[str, np.ndarray]]:
    """celltune predictions: flags on the perturbed genes, averaged over control cells."""
    from tqdm.auto import tqdm

    from celltune.tasks.perturbation import predict_cells

    n = min(n_ctrl or run.config.data.n_eval_ctrl, len(run.controls))
    rng = np.random.default_rng([run.config.train.seed, 29])
    controls = run.controls[np.sort(rng.choice(len(run.controls), n, replace=False))]
    model_pred: dict[str, np.ndarray] = {}
    for c in tqdm(placeable, desc="predict test", disable=quiet, leave=False):
        ids, cols = run.flag_inputs(_genes_of(c))
        pred = predict_cells(
            run.model,
            controls,
            ids,
            cols,
            max_seq_len=run.config.data.max_seq_len,
            batch_size=run.config.train.eval_batch_size or run.config.train.batch_size,
            seed=run.config.train.seed,
            n_measured=len(run.genes),
            include_zero_gene=run.config.data.include_zero_gene,
        )
        model_pred[c] = pred.mean(axis=0).astype(np.float64)
    return n, model_pred


def _score(
    conds: list[str], methods: dict[str, dict[str, Any]], inputs: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Per-perturbation and summary metrics of every method on ``conds``, and the ceiling."""
    from celltune.eval.perturbation import evaluate_predictions
    from celltune.eval.perturbation_ceiling import CEILING_NAME, noise_ceiling

    sub = {
        k: {c: v for c, v in inputs[k].items() if c in conds}
        for k in ("true_cells", "de_idx", "non_dropout_idx")
    }
    nz = inputs["non_zero_idx"]
    groups = {g: [c for c in m if c in conds] for g, m in inputs["subgroups"].items()}
    res = {}
    for name, preds in methods.items():
        per, summary = evaluate_predictions(
            {c: preds[c] for c in conds},
            sub["true_cells"],
            inputs["ctrl_mean"],
            sub["de_idx"],
            sub["non_dropout_idx"],
            None if nz is None else {c: v for c, v in nz.items() if c in conds},
            {g: m for g, m in groups.items() if m},
            pert_mean=inputs["pert_mean"],
            target_idx=inputs["target_idx"],
        )
        res[name] = (per, summary)
    ceiling = noise_ceiling(
        sub["true_cells"],
        inputs["ctrl_mean"],
        sub["de_idx"],
        non_dropout_idx=sub["non_dropout_idx"],
        non_zero_idx=None if nz is None else {c: v for c, v in nz.items() if c in conds},
        subgroups={g: m for g, m in groups.items() if m},
        pert_mean=inputs["pert_mean"],
        target_idx=inputs["target_idx"],
        seed=seed,
    )
    if ceiling is not None:
        res[CEILING_NAME] = ceiling
    return res


def _write_tables(scopes: dict[str, dict[str, Any]], out: Path) -> pd.DataFrame:
    """``metrics_per_perturbation.csv`` and ``metrics_summary.csv``; returns the summary."""
    from celltune.eval.perturbation import summary_table
    from celltune.files import atomic_path

    per_frames, tables = [], []
    for scope, res in scopes.items():
        for name, (per, _) in res.items():
            per_frames.append(per.reset_index().assign(method=name, scope=scope))
        table = summary_table({k: s for k, (_, s) in res.items()}, TABLE_METRICS)
        tables.append(table.assign(scope=scope))
    per_all = pd.concat(per_frames, ignore_index=True)
    lead = ["scope", "method", "condition", "subgroup"]
    per_all = per_all[lead + [c for c in per_all.columns if c not in lead]]
    table = pd.concat(tables, ignore_index=True)
    table = table[["scope", "method", "subgroup", "n", *TABLE_METRICS]]
    with atomic_path(out / "metrics_per_perturbation.csv") as tmp:
        per_all.to_csv(tmp, index=False)
    with atomic_path(out / "metrics_summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _plots(
    adata: Any,
    inputs: dict[str, Any],
    sets: dict[str, list[str]],
    model_pred: dict[str, np.ndarray],
    base_pred: dict[str, dict[str, Any]],
    out: Path,
    n_plots: int,
) -> tuple[list[Path], list[str]]:
    """DE boxplots, the delta scatter and the delta-similarity matrix (failures only warn)."""
    from celltune.report import perturbation_plots as pplots

    C = inputs["ctrl_mean"]
    true_means = {c: inputs["true_cells"][c].mean(axis=0) for c in sets["test"]}
    images: list[Path] = []
    captions: list[str] = []
    plot_conds = sets["measured"] or sets["placeable"] or sets["test"]
    shown = {MODEL_NAME: model_pred} if sets["placeable"] else {}
    shown.update({k: base_pred[k] for k in ("train_mean", "linear", "additive")})
    try:
        for c in sorted(plot_conds, key=lambda c: -len(inputs["true_cells"][c]))[:n_plots]:
            p = out / f"perturbation_de_{c.replace('+', '_')}.png"
            images.append(
                pplots.plot_de_boxplot(
                    c,
                    inputs["true_cells"][c],
                    C,
                    inputs["de_idx"][c],
                    adata.var["gene_name"].astype(str).tolist(),
                    {k: v[c] for k, v in shown.items()},
                    p,
                )
            )
            captions.append(f"{c}: true change of the top-20 DE genes (boxes), predictions")
        images.append(
            pplots.plot_delta_scatter(
                plot_conds,
                true_means,
                {k: {c: v[c] for c in plot_conds} for k, v in shown.items()},
                C,
                out / "perturbation_delta_scatter.png",
                de_idx=inputs["de_idx"],
            )
        )
        captions.append("predicted vs true change vs control, every gene of every perturbation")
        if len(plot_conds) > 1:
            images.append(
                pplots.plot_delta_similarity(
                    plot_conds,
                    true_means,
                    {k: {c: v[c] for c in plot_conds} for k, v in shown.items()},
                    C,
                    out / "perturbation_delta_similarity.png",
                )
            )
            captions.append(
                "similarity of the changes of different perturbations: truth vs predictions"
            )
    except Exception as err:  # plots must not sink a finished evaluation
        logger.warning("perturbation plots failed: %s: %s", type(err).__name__, err)
    return images, captions


def _metrics(
    run: Any,
    out: Path,
    data_path: Path,
    sets: dict[str, list[str]],
    n: int,
    scopes: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The content of ``metrics.json`` (the caller adds ``seconds``)."""
    return {
        "run": str(out),
        "data": str(data_path),
        "n_test_perturbations": len(sets["test"]),
        "n_test_measured_targets": len(sets["measured"]),
        "n_evaluated_by_model": len(sets["placeable"]),
        "excluded_from_model": sets["excluded"],
        "excluded_reason": "a perturbed gene is neither measured nor in the model's "
        "vocabulary, so no token can carry its flag; baselines still cover them",
        "model_untrained_gene_predictions": sets["untrained"],
        "scope_notes": {
            "measured": "test perturbations whose genes are all measured: the flag sits on "
            "an input gene; every method on the same perturbations",
            "all": "every test perturbation; celltune is listed only when it can flag all of "
            "them, and predicts unmeasured genes never perturbed in training from an "
            "untrained embedding (listed in model_untrained_gene_predictions)",
        },
        "n_ctrl": n,
        "train": {
            k: run.info.get(k)
            for k in (
                "fit_seconds",
                "best_epoch",
                "epochs_run",
                "validation",
                "n_train_perturbations",
                "n_unplaceable",
                "device",
            )
        },
        "scopes": {
            scope: {name: summary for name, (_, summary) in res.items()}
            for scope, res in scopes.items()
        },
    }


def _write_html(
    run: Any,
    out: Path,
    sets: dict[str, list[str]],
    n: int,
    scopes: dict[str, dict[str, Any]],
    table: pd.DataFrame,
    images: list[Path],
    captions: list[str],
) -> None:
    """``report.html``: what was scored, the metric tables, plots, training history."""
    from celltune.report.html import Section, write_report

    test, measured, excluded = sets["test"], sets["measured"], sets["excluded"]
    intro = [
        f"{len(test)} test perturbations, {len(measured)} of them of measured genes (scope "
        f"'measured': the flag sits on an input gene). The model can flag "
        f"{len(sets['placeable'])}; {len(sets['untrained'])} of those target unmeasured genes "
        "never perturbed in training, whose prediction rests on an untrained gene embedding "
        "(scope 'all')"
        + (f"; {len(excluded)} are scored for the baselines only." if excluded else "."),
        f"celltune predictions: mean over {n} control cells with the perturbed gene(s) "
        "flagged, clipped at 0. Train time "
        f"{run.info.get('fit_seconds')} s, best epoch {run.info.get('best_epoch')} by "
        f"validation pearson_delta ({run.info.get('validation')}).",
        "noise_ceiling: the mean of a random half of each test perturbation's real cells "
        "scored against the other half (perturbations with one cell have none): roughly the "
        "best any method can reach here. discrimination_l1 (1 = the true perturbation is "
        "the nearest by L1, 0.5 = chance), de_overlap_at_20, de_direction_agreement, mae and "
        "pearson_delta_pert_mean (deltas vs the mean of the training perturbations, "
        "Systema) use the real control cells; Train Mean cannot score well on them.",
        "pearson_delta = r(P − C, T − C) and its DE variant are the informative metrics; "
        "pearson_delta_centered = r(P − P̄, T − T̄) is 0 for a method that predicts one "
        "change for every perturbation (Train Mean).",
    ]
    sections = [Section("Run", text=intro)]
    for scope in scopes:
        title = (
            "Metrics: test perturbations of measured genes"
            if scope == "measured"
            else "Metrics: every test perturbation"
        )
        shown, notes = drop_duplicate_subgroups(table[table["scope"] == scope])
        drop = ["scope"] + (["subgroup"] if set(shown["subgroup"]) == {"all"} else [])
        sections.append(Section(title, text=notes, tables=[shown.drop(columns=drop)]))
    if images:
        sections.append(Section("Plots", images=images, captions=captions))
    hist_path = out / "history.csv"
    if hist_path.is_file():
        hist = pd.read_csv(hist_path)
        sections.append(Section("Training history", tables=[hist]))
    write_report(out / "report.html", "celltune perturb evaluate", sections, meta=str(out))


def drop_duplicate_subgroups(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``table`` without the subgroup rows that repeat the ``all`` row of every method
    (e.g. ``unseen_single`` when every test perturbation is an unseen single), and a note
    for each subgroup dropped."""
    values = [c for c in table.columns if c not in ("scope", "method", "subgroup")]
    notes, drop = [], []
    for group in [g for g in table["subgroup"].unique() if g != "all"]:
        same = True
        for _, rows in table.groupby("method", sort=False):
            ref, sub = rows[rows["subgroup"] == "all"], rows[rows["subgroup"] == group]
            if len(sub) and (len(ref) != 1 or not ref[values].iloc[0].equals(sub[values].iloc[0])):
                same = False
                break
        if same:
            drop.append(group)
            notes.append(
                f"Subgroup {group!r} is every test perturbation here: its rows equal 'all' "
                "and are shown once."
            )
    return table[~table["subgroup"].isin(drop)], notes


def _genes_of(cond: str) -> list[str]:
    return [g for g in str(cond).split("+") if g and g != "ctrl"]
