"""What the two-process (gloo, CPU) tests share: tests/test_ddp.py and tests/test_sync_bn.py."""
import socket

from iat.data import load_dataset


def bundle():
    return load_dataset("synthetic", n_train=160, n_test=16)  # 128 training examples: 4 steps of 32


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
