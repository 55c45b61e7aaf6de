"""``test_clip``: a tiny seeded random CLIP for tests (no download, ~10k parameters).

Image tower: an 8-pixel patch convolution to 16 channels, GELU, then a linear map to
``E = 16``. ``encode_image`` projects the mean of the patch grid; the toy dense path
projects every patch (as MaskCLIP projects every location instead of pooling), so the
un-normalised image embedding is the mean of the un-normalised dense ones. Text tower: a
byte embedding averaged over the prompt, then a linear map. Weights depend only on
``seed``; the global RNG is neither read nor advanced.
"""

from __future__ import annotations

import torch
from torch import nn

from hbird.zeroshot.clip.base import ClipModel

EMBED_DIM = 16
WIDTH = 16
PATCH = 8


class TestClip(ClipModel):
    """The tiny random CLIP behind ``test_clip`` (see the module docstring)."""

    has_dense = True
    __test__ = False  # not a pytest class

    def __init__(self, seed: int = 0, image_size: int = 32, name: str = "test_clip") -> None:
        super().__init__()
        self.name, self.embed_dim, self.image_size = name, EMBED_DIM, image_size
        self.weights_source = f"random:seed={seed}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
            self.image_proj = nn.Linear(WIDTH, EMBED_DIM, bias=False)
            self.bytes = nn.Embedding(256, WIDTH)
            self.text_proj = nn.Linear(WIDTH, EMBED_DIM, bias=False)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.patch(x)).permute(0, 2, 3, 1)  # (B, h, w, WIDTH)

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self._patches(x).mean(dim=(1, 2)))

    def _encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self._patches(x))

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = self.bytes.weight.device
        rows = [
            self.bytes(torch.tensor(list(p.encode("utf-8")) or [0], device=device)).mean(0)
            for p in prompts
        ]
        return self.text_proj(torch.stack(rows))


def create_test_clip(name: str, weights=None, seed: int = 0, **kwargs) -> TestClip:
    model = TestClip(seed=seed, name=name, **kwargs)
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)))
        model.weights_source = str(weights)
    return model
