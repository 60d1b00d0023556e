"""Ray + MLflow around rf_core: shared prior servers, Tune sweeps, dataset runs, comparison.

Empty until the diffusion prior and the reconstruction land; it will use only rf_core's
public names.
"""
