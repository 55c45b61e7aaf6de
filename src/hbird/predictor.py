"""``InContextPredictor``: the one object a user holds.

    p = InContextPredictor(encoder="vit_small_patch14_dinov2.lvd142m", k=30, temperature=0.02)
    p.fit(prompt_images, prompt_masks, task="segmentation", num_classes=21, ignore_index=255)
    masks = p.predict(query_images)        # (B, H, W) at each query's own size
    p.save("voc_bank/"); p2 = InContextPredictor.load("voc_bank/")
    p.add(more_images, more_masks)         # grow the prompt without rebuilding

It wires the rooms together: encoders → memory (labels, sampling, augmentation, bank)
→ index → decode. Constructor arguments are stored as given; ``fit`` validates them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird.data.inputs import as_image, as_images
from hbird.data.pairs import DatasetPairs, Pairs, PromptPairs
from hbird.data.transforms import resize_for_encoder, resize_label
from hbird.decode import (
    DensePrediction,
    aggregate,
    decode_dense,
    neighbour_attention,
    softmax_over_neighbours,
)
from hbird.encoders import Encoder, create_encoder, encode_batches
from hbird.encoders.precision import parse_autocast
from hbird.errors import BankError, InputError
from hbird.index import VectorIndex, create_index
from hbird.index.cache import cache_path, load_or_build
from hbird.labelspec import LabelSpec
from hbird.memory.augment import PromptAugmentation, image_generator
from hbird.memory.bank import BankWriter, MemoryBank, content_id
from hbird.memory.labels import pool_labels
from hbird.memory.sampling import default_sampler, per_image_budget, sample_patches

INDEX_CACHE = "indexes"
"""Sub-folder of a saved bank holding its built approximate indexes (see ``index.cache``)."""


class Timings:
    """Wall-clock seconds spent per stage (``encode``, ``search``, ``decode``), accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        """Return the accumulated seconds and start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds


@dataclass(frozen=True)
class PredictorConfig:
    """Settings of an :class:`InContextPredictor` (recorded in every bank it saves)."""

    encoder: str = "test_vit"
    weights: str | None = None
    pretrained: bool = False
    layers: int | tuple[int, ...] | None = None
    image_size: int = 224
    k: int = 30
    temperature: float = 0.02
    memory_size: int | None = None
    aug_epochs: int = 1
    augment_first_epoch: bool = False
    sampling: str | None = None
    index: str = "auto"
    key_dtype: str = "float16"
    batch_size: int = 16
    seed: int = 0
    features: str = "patch"
    fungi_support: int = 100_000
    autocast: str | None = None

    def validate(self) -> None:
        parse_autocast(self.autocast)
        checks = [
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.aug_epochs >= 1, f"aug_epochs must be >= 1, got {self.aug_epochs}"),
            (self.memory_size is None or self.memory_size >= 1, "memory_size must be >= 1 or None"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.features in ("patch", "fungi"),
                f"features must be 'patch' or 'fungi', not {self.features!r}",
            ),
            (
                self.features == "patch" or self.layers is None,
                "features='fungi' uses the last block's features; leave layers unset",
            ),
            (
                self.features == "patch" or self.autocast is None,
                "features='fungi' runs in full precision; leave autocast unset",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("layers"), list):
            known["layers"] = tuple(known["layers"])
        return cls(**known)


class InContextPredictor:
    """Dense prediction from a prompt of annotated images (Balazevic et al. 2023, eq. 1).

    Args:
        encoder: a registry name (any timm ViT, ``hf:<id>``, ``test_vit``...) or an
            :class:`~hbird.encoders.Encoder` instance.
        weights: local checkpoint for the encoder (safetensors or .pth).
        pretrained: load the encoder's published weights (timm/Hugging Face hub; needs
            network access the first time) when no ``weights`` file is given.
        layers: block index or indices whose patch features are used (default: last).
        image_size: short side the encoder sees (sides rounded to the patch size).
        k: neighbours per query patch. temperature: β of eq. 1.
        memory_size: total memory budget ``|M|`` (None keeps every labelled patch).
        aug_epochs: passes over the prompt; passes after the first are augmented (Table 7).
        sampling: ``"rarity"`` or ``"random"`` (default: rarity for classes, random otherwise).
        index: ``auto``, ``exact``, ``flat``, ``ivfpq``, ``hnsw`` (``scann`` if installed).
        key_dtype: ``float16`` or ``float32`` storage of the keys.
        batch_size: images per encoder forward.
        device: where the encoder runs and the exact index keeps and scores its keys (on a
            GPU ``auto`` stays exact up to ``AUTO_EXACT_MAX_GPU`` keys).
        seed: seeds augmentation and sampling. progress: show progress bars.
        features: ``"patch"`` (the encoder's patch features) or ``"fungi"`` (dense FUNGI,
            Simoncini et al. 2024 appendix B.2: each patch feature concatenated with its
            projected SimCLR gradient; negatives come from a support set of up to
            ``fungi_support`` prompt patch features, fixed at ``fit`` and saved with the bank).
        autocast: ``"bf16"`` or ``"fp16"`` runs the encoder under autocast (about 2x faster
            on a GPU; features change slightly, so the setting is saved with the bank and
            used for queries too); ``None`` (default) for float32.
    """

    def __init__(
        self,
        encoder: str | Encoder = "test_vit",
        weights: str | Path | None = None,
        layers: int | Sequence[int] | None = None,
        image_size: int = 224,
        pretrained: bool = False,
        k: int = 30,
        temperature: float = 0.02,
        memory_size: int | None = None,
        aug_epochs: int = 1,
        sampling: str | None = None,
        index: str = "auto",
        index_params: dict[str, Any] | None = None,
        key_dtype: str = "float16",
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
        augment_first_epoch: bool = False,
        features: str = "patch",
        fungi_support: int = 100_000,
        autocast: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.config = PredictorConfig(
            encoder=encoder if isinstance(encoder, str) else encoder.name,
            weights=str(weights) if weights is not None else None,
            pretrained=pretrained,
            layers=tuple(layers) if isinstance(layers, Sequence) else layers,
            image_size=image_size,
            k=k,
            temperature=temperature,
            memory_size=memory_size,
            aug_epochs=aug_epochs,
            augment_first_epoch=augment_first_epoch,
            sampling=sampling,
            index=index,
            key_dtype=key_dtype,
            batch_size=batch_size,
            seed=seed,
            features=features,
            fungi_support=fungi_support,
            autocast=autocast,
        )
        self.index_params = dict(index_params or {})
        self.device = device
        self.progress = progress
        self.timings = Timings()

    # -- fitting ----------------------------------------------------------------------
    def _resolve_encoder(self) -> Encoder:
        if getattr(self, "encoder_", None) is None:
            if isinstance(self.encoder, Encoder):
                self.encoder_ = self.encoder.to(self.device).eval()
            else:
                self.encoder_ = create_encoder(
                    self.config.encoder,
                    weights=self.config.weights,
                    pretrained=self.config.pretrained and self.config.weights is None,
                    device=self.device,
                )
        return self.encoder_

    def _feature_dim(self) -> int:
        encoder = self._resolve_encoder()
        if self.config.features == "fungi":
            return 2 * encoder.embed_dim
        return encoder.feature_dim(self.config.layers)

    def _encode(self, encoder: Encoder, views: list[torch.Tensor], layers: Any, batch_size: int):
        """Views ``(3, H, W)`` → one ``(h, w, D)`` feature map each (patch or dense FUNGI)."""
        if self.config.features == "fungi":
            return self.fungi_.transform_patches(views)
        return encode_batches(
            encoder, views, layers=layers, batch_size=batch_size, autocast=self.config.autocast
        )

    def _fit_fungi(self, pairs: Pairs, support: torch.Tensor | None = None) -> None:
        """Fix dense FUNGI's support set: a seeded sample of the prompt's patch features."""
        from hbird.fungi.dense import DenseFungi

        encoder = self._resolve_encoder()
        if support is None:
            feats = []
            for i in tqdm(
                range(len(pairs)), desc="FUNGI support", unit="img", disable=not self.progress
            ):
                image, _, _ = pairs.load(i)
                view = resize_for_encoder(image, self.config.image_size, encoder.patch_size)
                feats.append(encode_batches(encoder, [view])[0].reshape(-1, encoder.embed_dim))
            support = torch.cat(feats)
            if len(support) > self.config.fungi_support:
                gen = torch.Generator().manual_seed(self.config.seed)
                keep = torch.randperm(len(support), generator=gen)[: self.config.fungi_support]
                support = support[torch.sort(keep).values]
        self.fungi_ = DenseFungi(
            encoder, seed=self.config.seed, batch_size=self.config.batch_size
        ).fit(support)

    def _new_bank(self, spec: LabelSpec, num_images: int) -> MemoryBank:
        encoder = self._resolve_encoder()
        config = self.config.to_dict()
        config["budget_per_image"] = per_image_budget(
            self.config.memory_size, num_images, self.config.aug_epochs
        )
        config["sampling"] = self.config.sampling or default_sampler(spec.task)
        return MemoryBank(
            self._feature_dim(),
            spec,
            encoder.identity(),
            self.config.key_dtype,
            config,
        )

    def fit(
        self,
        images: Sequence[Any] | torch.Tensor,
        labels: Sequence[Any] | torch.Tensor,
        task: str = "segmentation",
        num_classes: int | None = None,
        ignore_index: int | None = 255,
        label_spec: LabelSpec | None = None,
        **spec_fields: Any,
    ) -> InContextPredictor:
        """Build the memory from a prompt of images and their per-pixel labels.

        Args:
            images: paths, PIL images, ``(H, W, 3)`` arrays, ``(3, H, W)`` tensors, or a
                ``(B, 3, H, W)`` batch.
            labels: one per image: class-id masks ``(H, W)`` for segmentation, depth in
                metres ``(H, W)`` or vectors ``(H, W, C)`` for regression (paths too).
            task, num_classes, ignore_index, **spec_fields: the :class:`LabelSpec`
                (or pass ``label_spec`` directly).
        """
        if label_spec is None:
            if task == "segmentation" and num_classes is None:
                raise ValueError(
                    "segmentation needs num_classes (the number of class ids in the masks)"
                )
            label_spec = LabelSpec(
                task=task, num_classes=num_classes, ignore_index=ignore_index, **spec_fields
            )
        return self.fit_pairs(PromptPairs(images, labels, label_spec), label_spec)

    def fit_dataset(self, dataset: Any) -> InContextPredictor:
        """Build the memory from a dataset (``len``, ``ds[i]`` → sample, ``label_spec``)."""
        return self.fit_pairs(DatasetPairs(dataset), dataset.label_spec)

    def fit_pairs(self, pairs: Pairs, label_spec: LabelSpec) -> InContextPredictor:
        """Build the memory from any :class:`Pairs` source."""
        self.config.validate()
        self.label_spec_ = label_spec
        if self.config.features == "fungi":
            self._fit_fungi(pairs)
        self.bank_ = self._new_bank(label_spec, len(pairs))
        for _, keys, values in self._memory_entries(pairs, self.bank_, start_index=0):
            self.bank_.append(keys, values)
        self.bank_.num_images = len(pairs)
        self._check_not_empty()
        self._build_index()
        return self

    def add(
        self, images: Sequence[Any] | torch.Tensor, labels: Sequence[Any] | torch.Tensor
    ) -> InContextPredictor:
        """Grow the prompt: new entries are appended to the bank and the index."""
        self._check_fitted()
        pairs = PromptPairs(images, labels, self.label_spec_)
        start = self.bank_.num_images
        before = len(self.bank_)
        for _, keys, values in self._memory_entries(pairs, self.bank_, start_index=start):
            self.bank_.append(keys, values)
        self.bank_.num_images += len(pairs)
        self.index_.add(self.bank_.keys[before:])
        return self

    def build_bank(
        self,
        pairs: Pairs,
        label_spec: LabelSpec,
        path: str | Path,
        shard_size: int = 1_000_000,
        overwrite: bool = False,
    ) -> Path:
        """Stream a (large) prompt into a bank folder, resuming an interrupted build."""
        self.config.validate()
        if self.config.features == "fungi":
            self._fit_fungi(pairs)  # deterministic: a resumed build recomputes the same support
        bank = self._new_bank(label_spec, len(pairs))
        writer = BankWriter(
            path,
            feature_dim=bank.feature_dim,
            label_spec=label_spec,
            encoder=bank.encoder,
            key_dtype=bank.key_dtype,
            config=bank.config,
            shard_size=shard_size,
            overwrite=overwrite,
        )
        for item, keys, values in self._memory_entries(pairs, bank, 0, skip=writer.done):
            writer.add(keys, values, item=item, images=int(item.startswith("0:")))
        writer.bank.attachments = self._attachments()
        return writer.finalize()

    def _memory_entries(
        self, pairs: Pairs, bank: MemoryBank, start_index: int, skip: set[str] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield ``(item, keys (n, D), values (n, C))`` per (epoch, image), ``item = "epoch:index"``."""
        cfg = self.config
        encoder = self._resolve_encoder()
        spec = bank.label_spec
        augment = PromptAugmentation(cfg.image_size, encoder.patch_size)
        budget = bank.config["budget_per_image"]
        sampler = bank.config["sampling"]
        todo = [
            (epoch, i)
            for epoch in range(cfg.aug_epochs)
            for i in range(len(pairs))
            if f"{epoch}:{start_index + i}" not in skip
        ]
        bar = tqdm(total=len(todo), desc="building memory", unit="img", disable=not self.progress)
        for chunk_start in range(0, len(todo), cfg.batch_size):
            chunk = todo[chunk_start : chunk_start + cfg.batch_size]
            views = [
                self._prompt_view(pairs, epoch, i, start_index, spec, augment) for epoch, i in chunk
            ]
            feats = self._encode(
                encoder, [v[0] for v in views], layers=cfg.layers, batch_size=cfg.batch_size
            )
            for (epoch, i), (_, label, name), feat in zip(chunk, views, feats):
                values, valid = self._pool(label, encoder.patch_size, spec, name)
                gen = image_generator(cfg.seed + 1, epoch, start_index + i)
                keep = sample_patches(sampler, values, valid, budget, gen)
                yield (
                    f"{epoch}:{start_index + i}",
                    feat.reshape(-1, feat.shape[-1])[keep],
                    values[keep],
                )
                bar.update(1)
        bar.close()

    def _prompt_view(
        self, pairs: Pairs, epoch: int, i: int, start_index: int, spec: LabelSpec, augment
    ):
        """Load one prompt pair and produce the view the encoder sees in this epoch."""
        image, label, label_name = pairs.load(i)
        if epoch == 0 and not self.config.augment_first_epoch:
            view = resize_for_encoder(
                image, self.config.image_size, self._resolve_encoder().patch_size
            )
            return view, resize_label(label, tuple(view.shape[-2:])), label_name
        gen = image_generator(self.config.seed, epoch, start_index + i)
        view, label = augment(image, label, spec, gen)
        return view, label, label_name

    @staticmethod
    def _pool(label: torch.Tensor, patch_size: int, spec: LabelSpec, name: str):
        try:
            values, valid = pool_labels(label, patch_size, spec)
        except InputError as err:
            raise InputError(f"label {name}: {err}") from None
        return values, valid

    def _check_not_empty(self) -> None:
        if len(self.bank_) == 0:
            what = (
                "labelled pixel (every pixel is the ignore index)"
                if self.label_spec_.is_classification
                else ("valid target value (all pixels are 0, NaN, inf or out of range)")
            )
            raise InputError(
                f"the prompt has no {what}; check the labels and the ignore index / valid range"
            )

    def _empty_index(self) -> VectorIndex:
        """The configured index for the current bank, before any key is added."""
        return create_index(
            self.config.index,
            self.bank_.feature_dim,
            expected_size=len(self.bank_),
            device=self.device,
            **self.index_params,
        )

    def _build_index(self, bank_path: Path | None = None) -> None:
        """Index the bank's keys; a saved bank keeps its built index in ``indexes/``."""
        source = content_id(MemoryBank.read_manifest(bank_path)) if bank_path else None
        cache = bank_path / INDEX_CACHE if bank_path else None
        with self.timings.measure("index"):
            self.index_ = load_or_build(
                self._empty_index(), self._fill_index, len(self.bank_), cache, source
            )

    def _fill_index(self, index: VectorIndex) -> VectorIndex:
        """Add the bank's keys to ``index``: shard by shard from disk if not in memory."""
        if self.bank_.keys_in_memory:
            return index.fill(self.bank_.keys, progress=self.progress)
        return index.fill_from(self.bank_.iter_keys, len(self.bank_), progress=self.progress)

    def _check_fitted(self) -> None:
        if getattr(self, "bank_", None) is None:
            raise RuntimeError(
                "this predictor has no memory yet: call fit(images, labels, ...) or load a bank first"
            )

    # -- prediction -------------------------------------------------------------------
    def predict(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Labels at each query's own size.

        Returns ``(B, H, W)`` for a ``(B, 3, H, W)`` batch tensor, otherwise a list with
        one ``(H, W)`` (or ``(H, W, C)``) tensor per image: class ids for segmentation,
        values for depth/regression.
        """
        predictions = [p.labels for p in self.predict_dense(images)]
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return torch.stack(predictions)
        return predictions

    def predict_dense(self, images: Sequence[Any] | torch.Tensor) -> list[DensePrediction]:
        """Full predictions (labels, per-pixel confidence, patch soft labels) per image."""
        self._check_fitted()
        images = as_images(images) if isinstance(images, torch.Tensor) else list(images)
        out: list[DensePrediction] = []
        bs = self.config.batch_size
        bar = tqdm(total=len(images), desc="predicting", unit="img", disable=not self.progress)
        for start in range(0, len(images), bs):
            loaded = [as_image(x) for x in images[start : start + bs]]
            for image, patch_labels, confidence in zip(loaded, *self._predict_patches(loaded)):
                with self.timings.measure("decode"):
                    size = tuple(image.shape[-2:])
                    classify = self.label_spec_.is_classification
                    out.append(decode_dense(patch_labels, size, classify, confidence))
                bar.update(1)
        bar.close()
        return out

    def _predict_patches(
        self, images: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Eq. 1 for every patch: ``(h, w, C)`` soft labels and ``(h, w)`` top weights."""
        encoder = self._resolve_encoder()
        with self.timings.measure("encode"):
            size = self.config.image_size
            views = [resize_for_encoder(x, size, encoder.patch_size) for x in images]
            feats = self._encode(
                encoder, views, layers=self.config.layers, batch_size=self.config.batch_size
            )
        soft, top = [], []
        for feat in feats:
            h, w, d = feat.shape
            weights, values = self.attend(feat.reshape(h * w, d))
            with self.timings.measure("decode"):
                soft.append(aggregate(weights, values).reshape(h, w, -1))
                top.append(weights.max(dim=-1).values.reshape(h, w))
        return soft, top

    def attend(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, D)`` query features → eq.-1 weights ``(Q, k)`` and neighbour values ``(Q, k, C)``.

        Cosines are exact whatever the index: from its scores when they are the exact inner
        products of the stored keys (divided by both norms), else recomputed from the keys.
        """
        with self.timings.measure("search"):
            sims, ids = self.index_.search(queries, self.config.k)  # (Q, k)
        with self.timings.measure("decode"):
            valid = ids >= 0
            safe = ids.clamp_min(0)
            beta = self.config.temperature
            if self.index_.exact_scores:
                q_norms = torch.linalg.vector_norm(queries.to(torch.float32), dim=-1)  # (Q,)
                cosines = sims / (q_norms[:, None] * self._key_norms()[safe]).clamp_min(1e-12)
                weights = softmax_over_neighbours(cosines.masked_fill(~valid, 0.0), beta, valid)
            else:
                keys = self.bank_.keys[safe]  # (Q, k, D)
                weights = neighbour_attention(queries, keys, beta, valid)
            return weights, self.bank_.values[safe]

    def _key_norms(self) -> torch.Tensor:
        """``(N,)`` float32 norms of the stored keys (1 up to their storage rounding)."""
        norms = getattr(self, "key_norms_", None)
        if norms is None or norms.shape[0] != len(self.bank_):
            norms = self.key_norms_ = self.bank_.key_norms()
        return norms

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the memory bank (with this predictor's settings) to a folder."""
        self._check_fitted()
        settings = self.config.to_dict()
        if settings["sampling"] is None:  # keep the sampler the bank was built with, resolved
            del settings["sampling"]
        self.bank_.config.update(settings)
        self.bank_.attachments = self._attachments()
        path = self.bank_.save(path, overwrite=overwrite)
        # keep the built index where the next load looks for it (keyed like a fresh build)
        empty = self._empty_index()
        if empty.kind == self.index_.kind != "exact" and self.index_.ntotal == len(self.bank_):
            source = content_id(MemoryBank.read_manifest(path))
            self.index_.save(cache_path(path / INDEX_CACHE, source, empty))
        return path

    def _attachments(self) -> dict[str, torch.Tensor]:
        if self.config.features == "fungi":
            return {"fungi_support": self.fungi_.support_}
        return {}

    @classmethod
    def load(
        cls,
        path: str | Path,
        encoder: str | Encoder | None = None,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        index_params: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> InContextPredictor:
        """Rebuild a predictor from a bank folder; refuses a bank made with another encoder.

        ``overrides`` change search-time settings (``k``, ``temperature``, ``index``...);
        ``index_params`` go to the index backend (e.g. ``{"k_factor": 16}`` for IVF-PQ).
        """
        manifest = MemoryBank.read_manifest(path)
        config = PredictorConfig.from_dict(manifest.get("config", {}))
        if weights is not None:
            config = replace(config, weights=str(weights))
        config = replace(config, **overrides)
        predictor = cls(
            encoder=encoder if encoder is not None else config.encoder,
            **{k: v for k, v in asdict(config).items() if k != "encoder"},
            index_params=index_params,
            device=device,
            progress=progress,
        )
        enc = predictor._resolve_encoder()
        predictor.bank_ = MemoryBank.load(  # keys stay on disk unless the index needs them
            path, encoder=enc.identity(), feature_dim=predictor._feature_dim(), keys=False
        )
        predictor.label_spec_ = predictor.bank_.label_spec
        if config.features == "fungi":
            if "fungi_support" not in predictor.bank_.attachments:
                raise BankError(f"{path} is a FUNGI bank without its support set; rebuild it")
            predictor._fit_fungi(None, support=predictor.bank_.attachments["fungi_support"])
        predictor._build_index(Path(path))
        return predictor
