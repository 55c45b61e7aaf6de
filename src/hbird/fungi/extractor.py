"""``FungiExtractor``: features from self-supervised gradients of a frozen model.

    fx = FungiExtractor(encoder, losses=("kl", "dino", "simclr"), seed=0)
    fx.fit(train_images)              # heads, projection, SimCLR negatives, PCA
    feats = fx.transform(images)      # (B, d): [grads..., embedding], L2-normalised, PCA'd

For every input and loss: the per-sample gradient of the loss w.r.t. one linear layer
(default: the last block's attention output projection, weight and bias), projected to
the embedding width by a seeded ±1 matrix and L2-normalised; the L2-normalised embedding
is appended, and the concatenation is reduced by a PCA fitted on the training features
(if ``pca_dim`` is set) and L2-normalised again (Simoncini et al. 2024, §3, Algorithm 1).

The views and losses follow FUNGI's Table 17 and the authors' code by default
(``preset="paper"``); ``preset="fast"`` keeps hbird's older, cheaper views
(:mod:`hbird.fungi.presets`). Every random draw comes from ``seed``, and every drawn
input can be given instead: ``heads``, ``projection``, ``crop_boxes``, ``negatives``.
A saved extractor records the projection's SHA-256, the crop seed and the hbird and
torch versions; ``load`` refuses a projection that no longer hashes the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

import hbird
from hbird.encoders.base import Encoder
from hbird.encoders.precision import AUTOCAST_NAMES, autocast_context, parse_autocast
from hbird.errors import InputError, check_format_version
from hbird.fungi.backbones import FungiBackbone, as_backbone
from hbird.fungi.gradients import (
    PASS_ELEMENTS,
    batch_size_of,
    batched_gradients_and_embeddings,
    gradient_dim,
    naive_gradients,
)
from hbird.fungi.losses import LOSSES, create_loss
from hbird.fungi.pca import PCA
from hbird.fungi.presets import (
    check_preset,
    preset_autocast,
    preset_loss_options,
    preset_resize,
)
from hbird.fungi.projection import MatrixProjection, RandomProjection, aligned_block_rows
from hbird.io.files import atomic_folder, has_file, save_tensors, write_json

EMBEDDING = "embedding"
"""Name of the embedding part in :meth:`FungiExtractor.extract_parts`."""

FORMAT_VERSION = 2
"""2: preset, resize, projection SHA-256, versions. 1 (no hash) was written under today's
``fast`` settings and loads as such."""
CONFIG_FILE = "fungi.json"
TENSORS_FILE = "tensors.safetensors"
PROJECTION_TENSOR = "projection.matrix"

Head = nn.Linear | tuple[torch.Tensor, torch.Tensor]


def combine_parts(parts: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Concatenate the L2-normalised parts ``names`` (each ``(N, D)``) → ``(N, len(names)·D)``."""
    missing = [n for n in names if n not in parts]
    if missing:
        raise KeyError(f"no feature part {missing}; available: {sorted(parts)}")
    return torch.cat([parts[n] for n in names], dim=1)


class FungiExtractor:
    """FUNGI features for images (an :class:`~hbird.encoders.Encoder`) or texts.

    Args:
        encoder: a frozen encoder, or any :class:`~hbird.fungi.backbones.FungiBackbone`
            (e.g. ``TextBackbone(bert, tokenizer)``).
        losses: names of the losses whose gradients are used, in feature order
            (``"kl"``, ``"dino"``, ``"simclr"``; DINO needs images). May be empty
            (embeddings only).
        layer: module path of the gradient layer under the model (default: the last
            block's attention output projection, e.g. ``"blocks.11.attn.proj"``).
        seed: seeds the heads, the crops, the projection and the choice of negatives.
        preset: ``"paper"`` (FUNGI Table 17 and the authors' code), ``"paper_bf16"`` (the
            same under bf16 autocast) or ``"fast"`` (hbird's older, cheaper views); see
            :mod:`hbird.fungi.presets`. ``loss_options``
            override it.
        pca_dim: reduce the concatenated features to this many dimensions with a PCA
            fitted on the training features; ``None`` keeps them whole.
        batch_size: inputs per batched gradient computation.
        image_size: side of the square input the embedding sees (the paper's 224).
        resize: ``"square"`` or ``"short-side"`` (:func:`~hbird.fungi.views.square_images`;
            default: the preset's).
        loss_options: per-loss keyword arguments overriding the preset's settings, e.g.
            ``{"simclr": {"num_negative_inputs": 16}, "dino": {"local_size": 48}}``
            (options of losses not in ``losses`` are ignored).
        heads: heads to use instead of the seeded ones, by ``"loss"`` (its only head) or
            ``"loss.head"`` (``"dino.student"``, ``"dino.teacher"``): an ``nn.Linear`` or
            a ``(weight (K, D), bias (K,))`` pair.
        projection: the gradient projection: a seed (default: ``seed``) for the ±1
            matrix scaled by ``1/sqrt(D)``, or a ``(gradient_dim, D)`` matrix ``P`` used as
            ``g ↦ g P``.
        crop_boxes: DINO's crop boxes instead of per-image draws: ``num_global + num_local``
            :class:`~hbird.fungi.views.CropBox` es of the canvas (global first) for every
            image, or a function of one canvas ``(3, C, C)`` giving them (not saveable).
        negatives: SimCLR's negative batch instead of a seeded choice of training inputs:
            ``(N, D)`` embeddings, or inputs whose views are embedded.
        autocast: ``"bf16"`` or ``"fp16"`` to run forward passes under autocast (where the
            device supports it), ``None`` for the preset's (full precision but under
            ``"paper_bf16"``).
        progress: show a progress bar.
        projection_cache_bytes: keep the random projection in memory when it is at most
            this large (it is regenerated block by block otherwise).
        max_pass_elements: split a batch so one forward/backward pass holds at most this
            many input values (pixels × channels; whole samples, at least one). Default:
            128 SimCLR patches of a 224 image; big passes are slower per image on CPUs and
            take more memory. ``None``: one pass per batch. Changes the features only by
            float rounding.

    Attributes (after ``fit``):
        backbone_, layer_name_, layer_, losses_ (``nn.ModuleDict``), projection_, pca_.
    """

    def __init__(
        self,
        encoder: Encoder | FungiBackbone,
        losses: Sequence[str] = ("kl", "dino", "simclr"),
        layer: str | None = None,
        seed: int = 0,
        preset: str = "paper",
        pca_dim: int | None = None,
        batch_size: int = 16,
        image_size: int = 224,
        resize: str | None = None,
        loss_options: dict[str, dict[str, Any]] | None = None,
        heads: dict[str, Head] | None = None,
        projection: int | torch.Tensor | None = None,
        crop_boxes: Any = None,
        negatives: torch.Tensor | Sequence[Any] | None = None,
        autocast: str | torch.dtype | None = None,
        progress: bool = False,
        projection_cache_bytes: int = 64 << 20,
        max_pass_elements: int | None = PASS_ELEMENTS,
    ) -> None:
        self.encoder = encoder
        self.losses = tuple(losses)
        self.layer = layer
        self.seed = seed
        self.preset = preset
        self.pca_dim = pca_dim
        self.batch_size = batch_size
        self.image_size = image_size
        self.resize = resize
        self.loss_options = {k: dict(v) for k, v in (loss_options or {}).items()}
        self.heads = dict(heads or {})
        self.projection = projection
        self.crop_boxes = crop_boxes
        self.negatives = negatives
        self.autocast = autocast
        self.progress = progress
        self.projection_cache_bytes = projection_cache_bytes
        self.max_pass_elements = max_pass_elements

    # -- building -----------------------------------------------------------------------
    def _validate(self) -> None:
        check_preset(self.preset)
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"losses lists a loss twice: {self.losses}")
        unknown = sorted(set(self.loss_options) - set(LOSSES))
        if unknown:
            raise ValueError(
                f"loss_options name {unknown}, which are not FUNGI losses ({', '.join(LOSSES)})"
            )
        for arg, loss, value in (
            ("crop_boxes", "dino", self.crop_boxes),
            ("negatives", "simclr", self.negatives),
        ):
            if value is not None and loss not in self.losses:
                raise ValueError(
                    f"{arg} is given but the {loss} loss is not in losses {self.losses}"
                )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_pass_elements is not None and self.max_pass_elements < 1:
            raise ValueError(
                f"max_pass_elements must be >= 1 or None, got {self.max_pass_elements}"
            )
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1 or None, got {self.pca_dim}")

    def _build(self) -> None:
        """Everything that depends only on the constructor arguments."""
        self._validate()
        self.autocast_dtype_ = parse_autocast(
            preset_autocast(self.preset) if self.autocast is None else self.autocast
        )
        resize = self.resize or preset_resize(self.preset)
        backbone = as_backbone(self.encoder, image_size=self.image_size, resize=resize)
        self.backbone_ = backbone
        self.layer_name_, self.layer_ = backbone.resolve_layer(self.layer)
        options = preset_loss_options(self.preset, backbone)
        for name, given in self.loss_options.items():
            options[name] = {**options.get(name, {}), **given}
        given = (("dino", "boxes", self.crop_boxes), ("simclr", "negatives", self.negatives))
        for name, key, item in given:
            if item is not None:
                options[name] = {**options.get(name, {}), key: item}
        self.losses_ = nn.ModuleDict(
            {
                name: create_loss(name, backbone, self.seed, **options.get(name, {}))
                for name in self.losses
            }
        ).to(backbone.device)
        self._set_heads()
        self.projection_ = self._make_projection(gradient_dim(self.layer_), backbone.embed_dim)
        self.pca_: PCA | None = None

    def _set_heads(self) -> None:
        for key, head in self.heads.items():
            name, _, head_name = key.partition(".")
            if name not in self.losses_:
                raise ValueError(f"heads names {key!r}, but the losses are {list(self.losses_)}")
            loss = self.losses_[name]
            if not head_name:
                if len(loss.head_names) != 1:
                    raise ValueError(
                        f"the {name} loss has heads {loss.head_names}; name one, e.g. "
                        f"heads={{'{name}.{loss.head_names[0]}': ...}}"
                    )
                head_name = loss.head_names[0]
            weight, bias = (head.weight, head.bias) if isinstance(head, nn.Linear) else head
            loss.set_head(head_name, weight, bias)

    def _make_projection(self, in_dim: int, out_dim: int) -> RandomProjection | MatrixProjection:
        if isinstance(self.projection, torch.Tensor):
            if tuple(self.projection.shape) != (in_dim, out_dim):
                raise ValueError(
                    f"projection matrix must be (gradient_dim, D) = ({in_dim}, {out_dim}) for "
                    f"{self.layer_name_}, got {tuple(self.projection.shape)}"
                )
            return MatrixProjection(self.projection)
        return RandomProjection(
            in_dim,
            out_dim,
            self.seed if self.projection is None else int(self.projection),
            block_rows=aligned_block_rows(self.layer_.in_features + 1, out_dim),
            cache_bytes=self.projection_cache_bytes,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "losses_"):
            raise RuntimeError("this FungiExtractor is not fitted; call fit(train_inputs) first")

    def _fit_state(self, train_inputs: Sequence[Any]) -> None:
        if len(train_inputs) == 0:
            raise InputError("FungiExtractor.fit needs at least one training input")
        self._build()
        for loss in self.losses_.values():
            loss.fit(self.backbone_, train_inputs, self.batch_size)

    def fit(self, train_inputs: Sequence[Any]) -> FungiExtractor:
        """Fix the heads, the projection, the SimCLR negatives and (with ``pca_dim``) the PCA."""
        self._fit_state(train_inputs)
        if self.pca_dim is not None:
            parts = self.extract_parts(train_inputs)
            self.pca_ = PCA(self.pca_dim).fit(combine_parts(parts, self.part_names))
        return self

    def fit_transform(self, train_inputs: Sequence[Any]) -> torch.Tensor:
        """``fit`` and return the training features ``(N, d)``, computing them once."""
        self._fit_state(train_inputs)
        parts = self.extract_parts(train_inputs)
        if self.pca_dim is not None:
            self.pca_ = PCA(self.pca_dim).fit(combine_parts(parts, self.part_names))
        return self.finish(parts)

    # -- features -----------------------------------------------------------------------
    @property
    def part_names(self) -> list[str]:
        """Feature parts in output order: one per loss, then the embedding."""
        return [*self.losses, EMBEDDING]

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`transform`'s output."""
        self._check_fitted()
        if self.pca_ is not None:
            return self.pca_.n_components
        return self.backbone_.embed_dim * len(self.part_names)

    def extract_parts(
        self, inputs: Sequence[Any], gradients: str = "batched"
    ) -> dict[str, torch.Tensor]:
        """The L2-normalised parts of the features, before concatenation and PCA.

        Args:
            inputs: images ``(3, H, W)`` in [0, 1] (or strings for a text backbone).
            gradients: ``"batched"`` (one backward per batch) or ``"naive"`` (one plain
                autograd backward per input; the slow reference).

        Returns:
            ``{loss name: (N, D) projected gradients, "embedding": (N, D)}`` on the CPU.
        """
        self._check_fitted()
        if gradients not in ("batched", "naive"):
            raise ValueError(f"gradients must be 'batched' or 'naive', got {gradients!r}")
        backbone = self.backbone_
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.part_names}
        bar = tqdm(
            total=len(inputs), desc="FUNGI features", unit="input", disable=not self.progress
        )
        for start in range(0, len(inputs), self.batch_size):
            batch = backbone.prepare(inputs[start : start + self.batch_size])
            size = batch_size_of(batch)
            embedding, grads = None, []
            for loss in self.losses_.values():
                if gradients == "naive":
                    grads.append(naive_gradients(backbone, self.layer_, loss, batch))
                    continue
                grad, views = batched_gradients_and_embeddings(
                    backbone, self.layer_, loss, batch, self.autocast_dtype_, self.max_pass_elements
                )
                grads.append(grad)
                if embedding is None and loss.input_group is not None:
                    embedding = views[loss.input_group][:, 0]  # already computed
            if embedding is None:
                with torch.no_grad(), autocast_context(backbone.device, self.autocast_dtype_):
                    embedding = backbone.embed(backbone.input_view(batch))
            chunks[EMBEDDING].append(self._normalised(embedding))
            if grads:
                projected = self.projection_(torch.cat(grads))  # all losses in one pass
                for name, part in zip(self.losses, projected.split(size)):
                    chunks[name].append(self._normalised(part))
            bar.update(size)
        bar.close()
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if self.backbone_.dtype == torch.float64 else torch.float32
        return F.normalize(x.detach().to(dtype), dim=-1).cpu()

    def finish(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parts → final features ``(N, d)``: concatenated, PCA'd if fitted, L2-normalised."""
        x = combine_parts(parts, self.part_names)
        if self.pca_ is not None:
            x = self.pca_.transform(x)
        return F.normalize(x, dim=-1)

    def transform(self, inputs: Sequence[Any]) -> torch.Tensor:
        """FUNGI features ``(B, d)`` of ``inputs`` (images ``(3, H, W)`` in [0, 1] or texts)."""
        return self.finish(self.extract_parts(inputs))

    # -- persistence --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What ``save`` writes to ``fungi.json`` (besides the tensors)."""
        self._check_fitted()
        given = {
            f"{name}.{key}": what
            for name, loss in self.losses_.items()
            for key, what in loss.given.items()
        }
        if isinstance(self.projection_, MatrixProjection):
            given["projection"] = "matrix"
        return {
            "format_version": FORMAT_VERSION,
            "hbird_version": hbird.__version__,
            "torch_version": torch.__version__,
            "backbone": self.backbone_.identity(),
            "modality": self.backbone_.modality,
            "preset": self.preset,
            "resize": getattr(self.backbone_, "resize", None),
            "losses": {name: loss.settings for name, loss in self.losses_.items()},
            "given": given,
            "layer": self.layer_name_,
            "seed": self.seed,
            "pca_dim": self.pca_dim,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "autocast": AUTOCAST_NAMES.get(self.autocast_dtype_),
            "projection": {**self.projection_.config(), "sha256": self.projection_.digest()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted extractor to the folder ``path`` (JSON config + safetensors)."""
        config = self.config()
        if config["losses"].get("dino", {}).get("boxes") == "function":
            raise InputError(
                "this extractor draws DINO crop boxes with a function, which cannot be saved; "
                "pass crop_boxes as a list of boxes (or leave it out) to save it"
            )
        tensors = {
            f"loss.{name}.{key}": value.detach().cpu().contiguous()
            for name, loss in self.losses_.items()
            for key, value in loss.state_dict().items()
        }
        if isinstance(self.projection_, MatrixProjection):
            tensors[PROJECTION_TENSOR] = self.projection_.matrix()
        if self.pca_ is not None:
            tensors.update({f"pca.{k}": v.contiguous() for k, v in self.pca_.state_dict().items()})
        with atomic_folder(path, "a saved FUNGI extractor", has_file(CONFIG_FILE)) as tmp:
            save_tensors(tmp / TENSORS_FILE, tensors)
            write_json(tmp / CONFIG_FILE, config, sort_keys=False)
        folder = Path(path)
        return folder

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        encoder: Encoder | FungiBackbone,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> FungiExtractor:
        """Reopen a saved extractor for ``encoder`` (which must be the one it was fitted with)."""
        folder = Path(path)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise InputError(f"{folder} is not a saved FUNGI extractor (no {CONFIG_FILE})")
        config = json.loads(config_path.read_text())
        check_format_version(config.get("format_version"), FORMAT_VERSION, config_path, InputError)
        tensors = load_file(str(folder / TENSORS_FILE))
        saved_projection = config["projection"]
        matrix = saved_projection.get("kind") == "matrix"
        fx = cls(
            encoder,
            losses=tuple(config["losses"]),
            layer=config["layer"],
            seed=config["seed"],
            preset=config.get("preset", "fast"),  # format 1 was written with today's fast
            pca_dim=config["pca_dim"],
            batch_size=batch_size or config["batch_size"],
            image_size=config["image_size"],
            resize=config.get("resize") or ("short-side" if "preset" not in config else None),
            loss_options=config["losses"],
            projection=tensors[PROJECTION_TENSOR] if matrix else saved_projection["seed"],
            autocast=config["autocast"],
            progress=progress,
        )
        fx._build()
        saved, current = config["backbone"], fx.backbone_.identity()
        if saved != current:
            raise InputError(
                f"{config_path} was fitted with {saved['name']} (config {saved['config_hash']}, "
                f"weights {saved['weights_hash']}) but the model given is {current['name']} "
                f"(config {current['config_hash']}, weights {current['weights_hash']}); load it "
                "with the same model and weights"
            )
        fx._check_projection(config, config_path)
        for name, loss in fx.losses_.items():
            prefix = f"loss.{name}."
            loss.load_tensors(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            loss.to(fx.backbone_.device)
            loss.given = {
                key[len(prefix) :]: what
                for key, what in config.get("given", {}).items()
                if key.startswith(prefix)
            }
        pca_state = {k[4:]: v for k, v in tensors.items() if k.startswith("pca.")}
        fx.pca_ = PCA.from_state(pca_state) if pca_state else None
        return fx

    def _check_projection(self, config: dict[str, Any], config_path: Path) -> None:
        """Refuse a projection that is not the one the saved extractor was fitted with."""
        saved = config["projection"]
        current = {**self.projection_.config(), "sha256": self.projection_.digest()}
        settings = [k for k in saved if k not in ("kind", "sha256")]
        if any(saved[k] != current.get(k) for k in settings):
            raise InputError(f"{config_path}: projection settings differ from this hbird's; refit")
        if "sha256" in saved and saved["sha256"] != current["sha256"]:
            made = f"hbird {config.get('hbird_version', '?')} and torch {config.get('torch_version', '?')}"
            how = (
                "the saved matrix was changed"
                if saved.get("kind") == "matrix"
                else f"this torch ({torch.__version__}) draws another matrix from seed "
                f"{saved['seed']} than the one it was saved with ({made})"
            )
            raise InputError(
                f"{config_path}: the gradient projection hashes to {current['sha256'][:12]}… "
                f"but was saved as {saved['sha256'][:12]}…: {how}. Features would differ from "
                "the saved ones; refit the extractor (or load it with the torch it was saved with)"
            )
