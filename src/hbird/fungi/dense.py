"""Dense FUNGI (appendix B.2): patch features enriched with per-patch SimCLR gradients.

A *support set* of prompt patch features is indexed once (``fit``). For an image, every
patch token goes through a random head (no L2 normalisation first, as for SimCLR); the
positives of a token are the other patch tokens of the same image, and the negatives of
the image are the ``num_neighbors`` nearest support features of each of its tokens. The
image's InfoNCE loss (temperature 0.07 on every similarity) is back-propagated once to the
gradient layer; the gradient of a linear layer is a sum over tokens,
``∂L/∂W = Σ_t g_t ⊗ [u_t, 1]``, and the term of token ``t`` is its per-patch gradient. It
is projected to the feature width with the seeded ±1 matrix (without ever forming the
``(T, D_out·(D_in+1))`` matrix), L2-normalised, concatenated with the L2-normalised patch
feature, and the result is L2-normalised: ``(h, w, 2·D)``.

Images are processed independently, so a patch's feature does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hbird.encoders.base import Encoder
from hbird.encoders.inference import runs_of_equal_size
from hbird.errors import InputError
from hbird.fungi.backbones import ImageBackbone
from hbird.fungi.gradients import LinearTap, gradient_dim
from hbird.fungi.heads import RandomHead
from hbird.fungi.losses.simclr import info_nce
from hbird.fungi.projection import RandomProjection, aligned_block_rows
from hbird.index import create_index
from hbird.specs import Range, Settings, setting


@dataclass(eq=False, repr=False)
class DenseFungi(Settings):
    """Per-patch FUNGI features for in-context dense prediction.

    Args: ``encoder`` (a frozen image encoder) and the fields below (help in their metadata).

    Attributes (after ``fit``):
        support_: ``(N, D)`` support features; index_: their L2-normalised copies, searched
        for negatives; head_, projection_, layer_name_, layer_.
    """

    encoder: Encoder
    layer: str | None = setting(
        None, "gradient layer path", default_text="the last block's attention output projection"
    )
    seed: int = setting(0, "seeds the head and the projection", kind=int)
    num_neighbors: int = setting(
        5, "support neighbours fetched per token as negatives", kind=int, valid=Range(1)
    )
    head_dim: int = setting(
        96, "width of the random head (as the image-level SimCLR loss)", kind=int, valid=Range(1)
    )
    temperature: float = setting(
        0.07, "InfoNCE temperature", kind=float, valid=Range(0, open_low=True)
    )
    batch_size: int = setting(4, "images per forward/backward pass", kind=int, valid=Range(1))
    progress: bool = setting(False, "show a progress bar", kind=bool)

    @property
    def feature_dim(self) -> int:
        """Width ``2·D`` of the dense features."""
        return 2 * self.encoder.embed_dim

    def fit(self, support: torch.Tensor) -> DenseFungi:
        """Index the support set: prompt patch features ``(N, D)`` (or ``(..., D)``)."""
        self.validate()
        dim = self.encoder.embed_dim
        if support.shape[-1] != dim or support.numel() == 0:
            raise InputError(
                f"support features must be non-empty (..., {dim}) patch features of "
                f"{self.encoder.name}, got shape {tuple(support.shape)}"
            )
        self.backbone_ = ImageBackbone(self.encoder)
        self.layer_name_, self.layer_ = self.backbone_.resolve_layer(self.layer)
        self.support_ = support.reshape(-1, dim).detach().to(torch.float32).cpu()
        self.index_ = create_index("exact", dim, device=self.backbone_.device)
        self.index_.add(F.normalize(self.support_, dim=-1))
        self.head_ = RandomHead(dim, self.head_dim, self.seed, "dense.simclr")
        self.projection_ = RandomProjection(
            gradient_dim(self.layer_),
            dim,
            self.seed,
            block_rows=aligned_block_rows(
                gradient_dim(self.layer_) // self.layer_.out_features, dim
            ),
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("DenseFungi is not fitted; call fit(support_patch_features) first")

    def _negatives(self, tokens: torch.Tensor) -> torch.Tensor:
        """Support features nearest to each token: ``(B, T, D)`` → ``(B, T·n, D)``."""
        b, t, d = tokens.shape
        queries = F.normalize(tokens.detach().reshape(-1, d).to(torch.float32).cpu(), dim=-1)
        _, ids = self.index_.search(queries, self.num_neighbors)  # (B·T, n)
        found = ids.clamp_min(0)  # fewer support entries than n: repeat the nearest ones
        found = torch.where(ids < 0, ids[:, :1].expand_as(ids), found)
        negatives = self.support_[found.reshape(-1)].reshape(b, t * ids.shape[1], d)
        return negatives.to(device=tokens.device, dtype=tokens.dtype)

    def token_gradients(
        self, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch features and per-patch gradient factors of a batch of equal-size views.

        Args:
            batch: ``(B, 3, H, W)`` in [0, 1], sides multiples of the patch size.

        Returns:
            ``features (B, h, w, D)``, ``g (B, h·w, D_out)`` and ``u (B, h·w, D_in + 1)``:
            the gradient of patch ``t`` is ``g[:, t] ⊗ u[:, t]``.
        """
        self._check_fitted()
        with torch.inference_mode(False), torch.enable_grad(), LinearTap(self.layer_) as tap:
            with tap.forward():
                feats = self.backbone_.patch_features(batch)  # (B, h, w, D)
            b, h, w, d = feats.shape
            tokens = feats.reshape(b, h * w, d)
            negatives = self.head_(self._negatives(tokens))
            loss = info_nce(self.head_(tokens), negatives, self.temperature).sum()
            (grad,) = tap.output_grads(loss)
        g, u = tap.per_token(grad.reshape(b, -1, grad.shape[-1]))
        # prefix tokens (CLS, registers) come first and are not patches
        return feats.detach(), g[:, -h * w :], u[:, -h * w :]

    def transform_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → dense FUNGI features ``(B, h, w, 2·D)``."""
        feats, g, u = self.token_gradients(batch)
        b, h, w, d = feats.shape
        projected = self.projection_.project_outer(
            g.reshape(b * h * w, -1), u.reshape(b * h * w, -1)
        )
        patches = F.normalize(feats.reshape(b * h * w, d).to(projected.dtype), dim=-1)
        combined = torch.cat([patches, F.normalize(projected, dim=-1)], dim=-1)
        return F.normalize(combined, dim=-1).reshape(b, h, w, 2 * d)

    def transform_patches(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Dense FUNGI features of each view.

        Args:
            views: ``(3, H, W)`` float images in [0, 1], already resized so ``H`` and ``W``
                are multiples of the patch size (``hbird.data.transforms.resize_for_encoder``).

        Returns:
            One ``(h, w, 2·D)`` float32 CPU tensor per view, L2-normalised along the last
            axis: ``[patch feature, projected patch gradient]`` (each half normalised).
        """
        self._check_fitted()
        for i, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or view.ndim != 3 or view.shape[0] != 3:
                raise InputError(f"view {i} must be a (3, H, W) image tensor in [0, 1]")
        out: list[torch.Tensor] = []
        device = self.backbone_.device
        bar = tqdm(total=len(views), desc="dense FUNGI", unit="img", disable=not self.progress)
        for run in runs_of_equal_size(views, self.batch_size):
            batch = torch.stack([views[i] for i in run]).to(device=device, dtype=torch.float32)
            feats = self.transform_batch(batch).to("cpu", torch.float32)
            out.extend(f.clone() for f in feats.unbind(0))
            bar.update(len(run))
        bar.close()
        return out
