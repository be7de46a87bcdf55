"""Training: the loop that owns optimizer, scheduler, scaler and checkpoints, and what it needs.

    trainer.py      Trainer: builds a run from a TrainConfig, trains, validates, checkpoints, resumes
    run_dir.py      a run directory's life: new, --resume, --overwrite; nothing lost on bad input
    optim.py        optimizers and lr schedules (registries)
    monitor.py      the catastrophic-overfitting rule, checked every epoch
    step.py         one optimizer step of a method (the trainer's and the layout timer's)
    speed.py        speed options (autocast, memory layout, torch.compile)
    layout.py       speed.layout / speed.compile = "auto": time the exact candidates (layouts; compiled ones
                    on CUDA) at the start of a run, keep the fastest
    distributed.py  torchrun / DistributedDataParallel
    checkpoint.py   safetensors checkpoints (tensors + a JSON header; loading runs no code)
    device.py       device resolution and the random-number state checkpoints carry
"""
