"""Training: the loop that owns optimizer, scheduler, scaler and checkpoints, and what it needs.

    trainer.py      Trainer: builds a run from a TrainConfig, trains, validates, checkpoints, resumes
    run_dir.py      a run directory's life: new, --resume, --overwrite; nothing lost on bad input
    optim.py        optimizers and lr schedules (registries)
    monitor.py      the catastrophic-overfitting rule, checked every epoch
    speed.py        opt-in speed options (autocast, channels_last, torch.compile)
    distributed.py  torchrun / DistributedDataParallel
    checkpoint.py   safetensors checkpoints (tensors + a JSON header; loading runs no code)
    device.py       device resolution and the random-number state checkpoints carry
"""
