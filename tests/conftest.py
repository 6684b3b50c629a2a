"""Suite-wide rules: no network, no hub downloads, GPU tests skip cleanly without a GPU."""

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # tests never touch the network: only loopback and local sockets
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        raise RuntimeError(f"a test tried to open a network connection to {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread for the test. Tiny tensors on a shared 2-core machine: two OpenMP threads competing with
    other jobs spin-wait and run 10-50x slower; and bitwise determinism is promised for a fixed thread count.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
