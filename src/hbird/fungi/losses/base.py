"""The contract of a FUNGI self-supervised loss, and the loss registry."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hbird.errors import InputError, spell
from hbird.fungi.heads import RandomHead
from hbird.fungi.views import ViewGroup, Views
from hbird.registry import Registry, check_options

LOSSES: Registry[type[GradientLoss]] = Registry("FUNGI loss")


class GradientLoss(nn.Module, abc.ABC):
    """A self-supervised loss whose gradients become features.

    A loss makes the views of a prepared batch (:meth:`make_views`), and scores the
    embeddings of those views *per sample* (:meth:`forward`): sample ``i``'s loss may only
    depend on sample ``i``'s views (and on fixed state such as heads and negatives), which
    is what makes the batched per-sample gradients exact.

    Heads and other fixed tensors are buffers, so ``state_dict`` holds everything that is
    saved with a fitted extractor. ``settings`` are the constructor keyword arguments;
    ``given`` describes the inputs given instead of drawn (e.g. the SimCLR negatives).

    Args:
        backbone: the frozen model (gives ``embed_dim``, the modality and image sizes).
        seed: the extractor seed.
    """

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]] = ("image", "text", "audio")
    input_group: ClassVar[int | None] = None
    """Index of a view group that is the prepared batch itself (one view per sample), if
    any: its embeddings are the inputs' embeddings, which the extractor then reuses."""

    def __init__(self, backbone: Any, seed: int) -> None:
        super().__init__()
        if backbone.modality not in self.modalities:
            raise ValueError(
                f"the {self.name} loss works on {' and '.join(self.modalities)} inputs, not "
                f"{backbone.modality}; choose among the losses for {backbone.modality}"
            )
        self.embed_dim = backbone.embed_dim
        self.seed = seed
        self.settings: dict[str, Any] = {}
        self.given: dict[str, str] = {}

    @abc.abstractmethod
    def make_views(self, batch: Views) -> list[ViewGroup]:
        """The view groups of a prepared batch of ``B`` samples (sample-major)."""

    @abc.abstractmethod
    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings ``(B, V_g, D)``, one per view group → per-sample losses ``(B,)``."""

    def fit(self, backbone: Any, inputs: Sequence[Any], batch_size: int) -> None:  # noqa: B027
        """Fix data-dependent state from training inputs (default: nothing to fix)."""

    @property
    def head_names(self) -> list[str]:
        """Names of the random heads (``"head"``, or DINO's ``"student"`` and ``"teacher"``)."""
        return [name for name, m in self.named_children() if isinstance(m, RandomHead)]

    def set_head(self, name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Use ``y = x weightᵀ + bias`` as head ``name`` instead of the seeded one.

        Args:
            weight: ``(K, D)``, with ``K`` the head's width and ``D`` the embedding width.
            bias: ``(K,)``.
        """
        if name not in self.head_names:
            raise ValueError(
                f"the {self.name} loss has no head {name!r}; its heads are {self.head_names}"
            )
        head = getattr(self, name)
        if tuple(weight.shape) != tuple(head.weight.shape) or tuple(bias.shape) != tuple(
            head.bias.shape
        ):
            raise ValueError(
                f"{self.name}.{name}: a head needs weight {tuple(head.weight.shape)} and bias "
                f"{tuple(head.bias.shape)}, got {tuple(weight.shape)} and {tuple(bias.shape)} "
                "(set the loss's head_dim to change its width)"
            )
        head.weight = weight.detach().to(head.weight).clone()
        head.bias = bias.detach().to(head.bias).clone()
        self.given[name] = "given weight and bias"

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore buffers saved from ``state_dict`` (shapes may differ before ``fit``)."""
        for key, value in tensors.items():
            owner = self.get_submodule(key.rsplit(".", 1)[0]) if "." in key else self
            owner.register_buffer(key.rsplit(".", 1)[-1], value.clone())


def create_loss(name: str, backbone: Any, seed: int, **settings: Any) -> GradientLoss:
    """Build the registered loss ``name`` (``"kl"``, ``"dino"``, ``"simclr"``)."""
    if name not in LOSSES:
        raise InputError(
            f"unknown FUNGI loss {name!r} in {spell('losses')}; choose among {', '.join(LOSSES)}"
        )
    cls = LOSSES.get(name)
    check_options(
        f"FUNGI loss {name!r}", cls.__init__, settings, "loss_options", ("backbone", "seed")
    )
    return cls(backbone, seed, **settings)
