"""What both training and evaluation run on, below them both: the device and seeds (`device.py`), the process
group of a multi-process run and its collectives (`distributed.py`, `sync_bn.py`), and checkpoint files
(`checkpoint.py`: safetensors tensors with the rest as JSON in the header). Nothing here knows about methods,
attacks, training or evaluation."""
