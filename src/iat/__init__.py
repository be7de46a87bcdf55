"""iat: inverse adversarial training (Dong et al., CVPR 2023) and robust evaluation in PyTorch.

Models take images in [0, 1] (NCHW) and return logits; normalisation lives inside the model.
"""
__version__ = "0.1.0"
