"""Suite-wide rules: no network, no hub downloads, GPU tests skip cleanly without a GPU."""

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import ldm  # noqa: E402
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig  # noqa: E402
from tests.helpers import CLIP, TOKENIZER_DIR, UNET, VAE, diffusers_config, trained_like_  # noqa: E402

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


@pytest.fixture(scope="module")
def tiny():
    """Tiny random components: the references, and ours holding the same weights (strict identity loads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    def unet_pair(in_channels: int):
        kw = {**UNET, "in_channels": in_channels}
        ref = trained_like_(UNet2DConditionModel(**kw), seed=1).eval()
        ours = ldm.UNet2DConditionModel(UNetConfig.from_diffusers(kw)).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref, ours

    ref_vae = trained_like_(AutoencoderKL(**VAE), seed=2).eval()
    vae = ldm.AutoencoderKL(VAEConfig.from_diffusers(VAE)).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    ref_text = trained_like_(CLIPTextModel(RefCLIPConfig(**CLIP)), seed=3).eval()
    text = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(CLIP)).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    return SimpleNamespace(unet=unet_pair(4), unet9=unet_pair(9), vae=(ref_vae, vae), text=(ref_text, text),
                           tokenizer=(CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd15"),
                                      ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15")),
                           scheduler_config=diffusers_config("sd15", "scheduler"))
