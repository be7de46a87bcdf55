"""What the speed-option tests share: tests/test_speed.py and tests/test_speed_auto.py."""
from iat import config as C


def small_cfg(steps: int, **speed) -> C.TrainConfig:
    """pgd-at on the small CNN and synthetic data, one short epoch; `speed` sets the [speed] section."""
    cfg = C.TrainConfig(method="pgd-at", model="cnn", device="cpu", progress=False)
    cfg.data = C.DataConfig(name="synthetic", val_size=32)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant")
    cfg.threat = C.ThreatModel(steps=steps)
    cfg.val = C.ValConfig(steps=1, n_examples=16, batch_size=16)
    C.update(cfg, {"speed": speed})
    return cfg
