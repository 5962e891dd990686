"""celltune.analysis layer (see docs/ARCHITECTURE.md): descriptive statistics of data.

``perturbation_stats``: zeros, significant changes and variance of Perturb-seq data.
"""
