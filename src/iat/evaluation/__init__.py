"""Evaluation: robust accuracy per example, its sanity checks, and loading the model to evaluate.

    accuracy.py   robust_accuracy: every attack verified, counted per example, worst case per example
    sanity.py     checks after Carlini et al. 2019 (gradient masking symptoms)
    sweep.py      accuracy against eps, and its checks
    loading.py    a run directory, an iat checkpoint or a plain PyTorch state_dict -> model
    pipeline.py   `iat eval`: load, attack, check, write the typed result record
"""
