"""celltune.eval layer: metrics and baselines (see docs/ARCHITECTURE.md).

- ``integration``: scIB metrics via scib-metrics (``scib_metrics_table``), AvgBIO/AvgBATCH;
- ``baselines``: PCA / Harmony / scVI integration baselines;
- ``perturbation``: GEARS/scGPT perturbation metrics (``evaluate_predictions``);
- ``perturbation_baselines``: control, Train Mean, additive and linear baselines.

Submodules are imported on demand: scib-metrics pulls in JAX (seconds to import), which
``celltune --help`` must not pay for.
"""
