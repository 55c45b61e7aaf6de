"""``InContextPredictor``: the one object a user holds.

    p = InContextPredictor(encoder="vit_small_patch14_dinov2.lvd142m", k=30, temperature=0.02)
    p.fit(prompt_images, prompt_masks, task="segmentation", num_classes=21, ignore_index=255)
    masks = p.predict(query_images)        # (B, H, W) at each query's own size
    p.save("voc_bank/"); p2 = InContextPredictor.load("voc_bank/")
    p.add(more_images, more_masks)         # grow the prompt without rebuilding
    p.remove(1)                            # drop the second prompt image's entries

It wires the rooms together: encoders → a feature extractor (``features``) → memory
(labels, sampling, augmentation, bank) → index → decode. Constructor arguments are stored
as given; ``fit`` validates them (``hbird.specs`` defines them and their defaults).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird import distributed
from hbird.data.inputs import as_image, as_images
from hbird.data.pairs import DatasetPairs, Pairs, PromptPairs
from hbird.data.transforms import resize_for_encoder
from hbird.decode import (
    DensePrediction,
    aggregate,
    decode_dense,
    neighbour_attention,
    softmax_over_neighbours,
)
from hbird.distributed.build import build_across_ranks, has_parts
from hbird.encoders import Encoder, check_device, create_encoder
from hbird.encoders.normalization import with_normalize
from hbird.errors import BankError, InputError, spell
from hbird.features import create_extractor
from hbird.features.cache import CachedFeatures
from hbird.index import VectorIndex, create_index
from hbird.index.cache import cache_path, load_or_build
from hbird.index.sharded import ShardedIndex, slice_bounds
from hbird.labelspec import LabelSpec
from hbird.memory.augment import image_generator
from hbird.memory.bank import UNKNOWN_IMAGE, BankWriter, MemoryBank, content_id
from hbird.memory.prompt import encode_prompt
from hbird.memory.rows import release_freed_memory
from hbird.memory.sampling import default_sampler, per_image_budget, sample_patches
from hbird.specs import RECORDED_SEARCH, BankSpec, SearchConfig, split_stored_config

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


_BANK, _SEARCH = BankSpec(), SearchConfig()  # the defaults, defined once in hbird.specs


class InContextPredictor:
    """Dense prediction from a prompt of annotated images (Balazevic et al. 2023, eq. 1).

    Every argument is stored under its own name (scikit-learn's contract). The ones of
    :class:`~hbird.specs.BankSpec` decide the memory and are frozen into ``spec_`` by
    ``fit``; the ones of :class:`~hbird.specs.SearchConfig` (``k``, ``temperature``,
    ``index``, ``index_params``, ``device``, ``batch_size``) are read at every search
    (:attr:`search`) and may be changed at any time, or when a bank is loaded.

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
        index_params: options of the index backend (e.g. ``{"k_factor": 16}`` for IVF-PQ).
        key_dtype: ``float16`` or ``float32`` storage of the keys.
        value_storage: ``dense`` or ``sparse`` values (class banks; lossless, 12 bytes an
            entry instead of ``4 C``: :mod:`hbird.memory.values`).
        batch_size: images per encoder forward.
        device: where the encoder runs and the exact index keeps and scores its keys (on a
            GPU ``auto`` stays exact up to ``AUTO_EXACT_MAX_GPU`` keys).
        seed: seeds augmentation, sampling and the feature extractor. progress: progress bars.
        feature_cache: a folder keeping each view's features on disk
            (:mod:`hbird.features.cache`), keyed by the encoder, the extractor and the
            view's pixels: refitting or predicting the same images again skips the encoder.
        workers: DataLoader worker processes that read and resize the next prompt images
            (and, in an evaluation, queries) while the encoder runs; 0 reads them in turn.
        features: a name in :data:`hbird.features.FEATURE_EXTRACTORS`: ``"patch"`` (the
            encoder's patch features) or ``"fungi"`` (dense FUNGI, Simoncini et al. 2024
            appendix B.2: each patch feature concatenated with its projected SimCLR
            gradient; negatives come from a support set of prompt patch features, fixed at
            ``fit`` and saved with the bank).
        feature_options: options of the feature extractor (``{"support_size": 100000}``
            for ``fungi``).
        autocast: ``"bf16"`` or ``"fp16"`` runs the encoder under autocast (about 2x faster
            on a GPU; features change slightly, so the setting is saved with the bank and
            used for queries too); ``None`` (default) for float32.
        normalize: image mean/std: ``"model"`` (default, the weights' own), ``"imagenet"``
            or ``"M,M,M/S,S,S"`` (:mod:`hbird.encoders.normalization`); recorded in the
            bank's encoder identity, and applied to an ``Encoder`` instance too.
        resize: ``"short-side"`` (default, aspect kept) or ``"square"`` (squashed to
            ``image_size`` × ``image_size``, as open-hummingbird-eval does); predictions
            come back at each query's own size either way.
        label_pooling: ``"exclude_ignore"`` (default: ignore pixels are left out of a
            patch's class fractions) or ``"ignore_as_class0"`` (they count as class 0, as
            open-hummingbird-eval pools them; segmentation only).
        shard_bank: under ``torchrun``, each process loads only its slice of a saved bank
            and searches are collective (:class:`~hbird.index.sharded.ShardedIndex`):
            every process then calls ``predict`` together. Off by default.

    Attributes (after ``fit`` or ``load``):
        spec_: the :class:`~hbird.specs.BankSpec` of the memory; encoder_, extractor_
        (a :class:`~hbird.features.FeatureExtractor`), bank_, index_, label_spec_.
        image_ids_: the ids of the prompt's images, in order: ``fit`` numbers them
            ``0..n-1``, ``add`` continues, ``remove`` takes ids out (None for a bank
            saved without image ids).
    """

    def __init__(
        self,
        encoder: str | Encoder = _BANK.encoder,
        weights: str | Path | None = _BANK.weights,
        layers: int | Sequence[int] | None = _BANK.layers,
        image_size: int = _BANK.image_size,
        pretrained: bool = _BANK.pretrained,
        k: int = _SEARCH.k,
        temperature: float = _SEARCH.temperature,
        memory_size: int | None = _BANK.memory_size,
        aug_epochs: int = _BANK.aug_epochs,
        sampling: str | None = _BANK.sampling,
        index: str = _SEARCH.index,
        index_params: dict[str, Any] | None = _SEARCH.index_params,
        key_dtype: str = _BANK.key_dtype,
        value_storage: str = _BANK.value_storage,
        batch_size: int = _SEARCH.batch_size,
        device: str | torch.device = _SEARCH.device,
        feature_cache: str | Path | None = _SEARCH.feature_cache,
        workers: int = _SEARCH.workers,
        seed: int = _BANK.seed,
        progress: bool = True,
        augment_first_epoch: bool = _BANK.augment_first_epoch,
        features: str = _BANK.features,
        feature_options: dict[str, Any] | None = _BANK.feature_options,
        autocast: str | None = _BANK.autocast,
        normalize: str = _BANK.normalize,
        resize: str = _BANK.resize,
        label_pooling: str = _BANK.label_pooling,
        shard_bank: bool = _SEARCH.shard_bank,
    ) -> None:
        self.encoder = encoder
        self.weights = weights
        self.layers = layers
        self.image_size = image_size
        self.pretrained = pretrained
        self.k = k
        self.temperature = temperature
        self.memory_size = memory_size
        self.aug_epochs = aug_epochs
        self.sampling = sampling
        self.index = index
        self.index_params = index_params
        self.key_dtype = key_dtype
        self.value_storage = value_storage
        self.batch_size = batch_size
        self.device = device
        self.feature_cache = feature_cache
        self.workers = workers
        self.seed = seed
        self.progress = progress
        self.augment_first_epoch = augment_first_epoch
        self.features = features
        self.feature_options = feature_options
        self.autocast = autocast
        self.normalize = normalize
        self.resize = resize
        self.label_pooling = label_pooling
        self.shard_bank = shard_bank
        self.timings = Timings()

    # -- parameters -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as stored (scikit-learn's ``get_params``)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    @property
    def bank_spec(self) -> BankSpec:
        """The :class:`BankSpec` this predictor's parameters ask for (validated)."""
        values = {n: getattr(self, n) for n in BankSpec.field_names()}
        values["encoder"] = self.encoder.name if isinstance(self.encoder, Encoder) else self.encoder
        values["weights"] = str(self.weights) if self.weights is not None else None
        if isinstance(self.layers, Sequence):
            values["layers"] = tuple(self.layers)
        values["feature_options"] = dict(self.feature_options or {})
        spec = BankSpec(**values)
        spec.validate()
        return spec

    @property
    def search(self) -> SearchConfig:
        """The :class:`SearchConfig` read at every search (validated)."""
        values = {n: getattr(self, n) for n in SearchConfig.field_names()}
        values["index_params"] = dict(self.index_params or {})
        values["device"] = str(self.device)
        if self.feature_cache is not None:
            values["feature_cache"] = str(self.feature_cache)
        search = SearchConfig(**values)
        search.validate()
        return search

    # -- fitting ----------------------------------------------------------------------
    def _prepare(self, spec: BankSpec) -> None:
        """Fix ``spec_`` and build its encoder and (unfitted) feature extractor."""
        if isinstance(self.encoder, Encoder):
            encoder = with_normalize(
                self.encoder.to(check_device(self.device)).eval(), spec.normalize
            )
        else:
            pretrained = spec.pretrained and spec.weights is None
            encoder = create_encoder(
                spec.encoder,
                weights=spec.weights,
                pretrained=pretrained,
                device=self.device,
                normalize=spec.normalize,
            )
        self.spec_, self.encoder_ = spec, encoder
        self.extractor_ = create_extractor(
            spec.features,
            encoder,
            layers=spec.layers,
            autocast=spec.autocast,
            batch_size=self.search.batch_size,
            seed=spec.seed,
            progress=self.progress,
            **(spec.feature_options or {}),
        )
        if self.search.feature_cache is not None:
            self.extractor_ = CachedFeatures(self.extractor_, self.search.feature_cache)
        self.key_norms_ = None

    def _plain_views(self, pairs: Pairs) -> Iterator[torch.Tensor]:
        """The prompt images as the encoder sees them, unaugmented, loaded one by one."""
        for i in range(len(pairs)):
            image, _, _ = pairs.load(i)
            yield self._view(image)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` → the unaugmented view the encoder sees (``resize`` mode)."""
        spec = self.spec_
        return resize_for_encoder(image, spec.image_size, self.encoder_.patch_size, spec.resize)

    def _new_bank(self, spec: LabelSpec, num_images: int) -> MemoryBank:
        if self.spec_.label_pooling == "ignore_as_class0" and not spec.is_classification:
            raise InputError(
                f"label_pooling=ignore_as_class0 (--label-pooling) pools class ids; the "
                f"prompt's labels are {spec.task}: use label_pooling=exclude_ignore"
            )
        config = self.spec_.to_dict()
        config["budget_per_image"] = per_image_budget(
            self.spec_.memory_size, num_images, self.spec_.aug_epochs
        )
        config["sampling"] = self.spec_.sampling or default_sampler(spec.task)
        config["extractor"] = self.extractor_.identity()
        bank = MemoryBank(
            self.extractor_.feature_dim,
            spec,
            self.encoder_.identity(),
            self.spec_.key_dtype,
            config,
            self.spec_.value_storage,
        )
        bank.search = {n: v for n, v in self.search.to_dict().items() if n in RECORDED_SEARCH}
        bank.attachments = self.extractor_.state()
        return bank

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
        self._prepare(self.bank_spec)
        self.label_spec_ = label_spec
        self.extractor_.fit(self._plain_views(pairs))
        self.bank_ = self._new_bank(label_spec, len(pairs))
        for item, keys, values in self._memory_entries(pairs, self.bank_, start_index=0):
            self.bank_.append(keys, values, image_ids=item_image(item))
        self.bank_.num_images = len(pairs)
        self.image_ids_ = list(range(len(pairs)))
        self._check_not_empty()
        self._build_index()
        return self

    def add(
        self, images: Sequence[Any] | torch.Tensor, labels: Sequence[Any] | torch.Tensor
    ) -> InContextPredictor:
        """Grow the prompt: new entries are appended to the bank and the index. The new
        images get the next ids (:attr:`image_ids_`), which also seed their sampling."""
        self._check_fitted()
        pairs = PromptPairs(images, labels, self.label_spec_)
        ids = self.image_ids_
        start = max([self.bank_.num_images, *(i + 1 for i in ids or [])])  # never reused
        before = len(self.bank_)
        for item, keys, values in self._memory_entries(pairs, self.bank_, start_index=start):
            self.bank_.append(keys, values, image_ids=item_image(item))
        self.bank_.num_images += len(pairs)
        if ids is not None:
            ids.extend(range(start, start + len(pairs)))
        self.index_.add(self.bank_.keys[before:])
        self.key_norms_ = None
        return self

    def remove(self, image_ids: int | Sequence[int]) -> InContextPredictor:
        """Drop prompt images (ids of :attr:`image_ids_`) and their bank entries; the index
        is rebuilt from the remaining keys (a retrain for IVF-PQ, a refill otherwise).

        With the default settings (no memory budget, one pass) the predictions then
        equal those of a predictor fitted on the remaining images. With a budget or
        augmentation passes, the remaining entries are the ones the full fit sampled.
        The FUNGI support set fixed at ``fit`` stays (as with :meth:`add`).
        """
        self._check_fitted()
        wanted = [image_ids] if isinstance(image_ids, int) else list(image_ids)
        if isinstance(self.index_, ShardedIndex):
            raise InputError("a bank sharded across processes (shard_bank) cannot remove images")
        if self.image_ids_ is None:
            self.bank_.remove(wanted)  # raises: the bank does not record image ids
        unknown = [i for i in wanted if i not in self.image_ids_]
        if unknown:
            raise InputError(
                f"image id(s) {unknown} are not in this predictor's prompt; its image ids are "
                f"{self.image_ids_} (fit numbers the prompt 0..n-1, add continues)"
            )
        entries = self.bank_.image_ids
        gone = torch.isin(entries, torch.tensor(wanted, dtype=torch.int64))
        if bool(gone.all()):
            raise InputError(
                f"removing image id(s) {wanted} would leave the memory empty; fit a new prompt"
            )
        with_entries = sorted(set(entries[gone].tolist()))
        self.bank_.remove(with_entries)
        self.bank_.num_images -= len(set(wanted)) - len(with_entries)  # images without entries
        self.image_ids_ = [i for i in self.image_ids_ if i not in wanted]
        self._build_index()
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
        self._prepare(self.bank_spec)
        self.extractor_.fit(self._plain_views(pairs))  # deterministic: same state on resume
        bank = self._new_bank(label_spec, len(pairs))
        if distributed.world_size() > 1 or has_parts(path):  # every rank, or resuming them
            return build_across_ranks(self, pairs, bank, path, shard_size, overwrite)
        writer = BankWriter.for_bank(path, bank, shard_size=shard_size, overwrite=overwrite)
        try:
            for item, keys, values in self._memory_entries(pairs, bank, 0, skip=writer.done):
                images = int(item.startswith("0:"))
                writer.add(keys, values, item=item, images=images, image_ids=item_image(item))
        except BaseException:  # an error or Ctrl-C: keep finished shards, or nothing
            writer.discard_if_empty()
            raise
        writer.bank.search, writer.bank.attachments = bank.search, bank.attachments
        return writer.finalize()

    def _memory_entries(
        self,
        pairs: Pairs,
        bank: MemoryBank,
        start_index: int,
        skip: set[str] = frozenset(),
        items: list[tuple[int, int]] | None = None,
        progress: bool | None = None,
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield ``(item, keys (n, D), values (n, C))`` per (epoch, image), ``item = "epoch:index"``
        (``items``: these ``(epoch, index)`` pairs, default every pass over every image)."""
        spec = self.spec_
        todo = (
            [
                (epoch, i)
                for epoch in range(spec.aug_epochs)
                for i in range(len(pairs))
                if f"{epoch}:{start_index + i}" not in skip
            ]
            if items is None
            else items
        )
        progress = self.progress if progress is None else progress
        batches = encode_prompt(
            pairs,
            self.extractor_.transform,
            bank.label_spec,
            spec.image_size,
            self.encoder_.patch_size,
            items=todo,
            augment_first_epoch=spec.augment_first_epoch,
            resize=spec.resize,
            ignore_as_class0=spec.label_pooling == "ignore_as_class0",
            seed=spec.seed,
            start=start_index,
            batch_size=self.search.batch_size,
            workers=self.search.workers,
            progress=progress and "building memory",
        )
        budget, sampler = bank.config["budget_per_image"], bank.config["sampling"]
        for batch in batches:
            release_freed_memory()  # the last batch's temporaries: RSS stays bank + batch
            for p in batch:
                gen = image_generator(spec.seed + 1, p.epoch, p.image)
                keep = sample_patches(sampler, p.values, p.valid, budget, gen)
                yield p.item, p.features[keep], p.values[keep]

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
        search = self.search
        return create_index(
            search.index,
            self.bank_.feature_dim,
            expected_size=len(self.bank_),
            device=self.device,
            **search.index_params,
        )

    def _build_index(self, bank_path: Path | None = None) -> None:
        """Index the bank's keys; a saved bank keeps its built index in ``indexes/``."""
        source = content_id(MemoryBank.read_manifest(bank_path)) if bank_path else None
        cache = bank_path / INDEX_CACHE if bank_path else None
        self.key_norms_ = None
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
        bs = self.search.batch_size
        bar = tqdm(total=len(images), desc="predicting", unit="img", disable=not self.progress)
        starts = list(range(0, len(images), bs))
        if isinstance(self.index_, ShardedIndex):  # searches are collective: as many per rank
            rounds = int(distributed.all_reduce(torch.tensor(len(starts)), "max"))
            starts += [len(images)] * (rounds - len(starts))
        for start in starts:
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
        """Eq. 1 for every patch: ``(h, w, C)`` soft labels and ``(h, w)`` top weights.

        Every image's patches ``(Σ h·w, D)`` go to one :meth:`attend`: per query the same
        neighbours as one search per image, and one collective call for a sharded index."""
        with self.timings.measure("encode"):
            feats = self.extractor_.transform([self._view(x) for x in images]) if images else []
        d = self.extractor_.feature_dim
        flat = torch.cat([f.reshape(-1, d) for f in feats]) if feats else torch.empty(0, d)
        weights, values = self.attend(flat)
        with self.timings.measure("decode"):
            soft_flat, top_flat = aggregate(weights, values), weights.max(dim=-1).values
        sizes = [f.shape[0] * f.shape[1] for f in feats]
        soft = [s.reshape(*f.shape[:2], -1) for s, f in zip(soft_flat.split(sizes), feats)]
        top = [t.reshape(f.shape[:2]) for t, f in zip(top_flat.split(sizes), feats)]
        return soft, top

    def attend(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, D)`` query features → eq.-1 weights ``(Q, k)`` and neighbour values ``(Q, k, C)``.

        Cosines are exact whatever the index: from its scores when they are the exact inner
        products of the stored keys (divided by both norms), else recomputed from the keys.
        """
        search = self.search
        if isinstance(self.index_, ShardedIndex):
            return self._attend_sharded(queries)
        with self.timings.measure("search"):
            sims, ids = self.index_.search(queries, search.k)  # (Q, k)
        with self.timings.measure("decode"):
            valid = ids >= 0
            safe = ids.clamp_min(0)
            beta = search.temperature
            if self.index_.exact_scores:
                q_norms = torch.linalg.vector_norm(queries.to(torch.float32), dim=-1)  # (Q,)
                cosines = sims / (q_norms[:, None] * self._key_norms()[safe]).clamp_min(1e-12)
                weights = softmax_over_neighbours(cosines.masked_fill(~valid, 0.0), beta, valid)
            else:
                keys = self.bank_.read_keys()[safe]  # (Q, k, D)
                weights = neighbour_attention(queries, keys, beta, valid)
            return weights, self.bank_.gather_values(safe)

    def _attend_sharded(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` over a bank split across ranks (collective): each neighbour's
        value and key norm (or key, for approximate scores) is fetched from its rank."""
        search, index = self.search, self.index_
        with self.timings.measure("search"):
            sims, ids = index.search(queries, search.k)  # (Q, k), global ids
            extra = self._key_norms()[:, None] if index.exact_scores else self.bank_.keys
            fetched = index.fetch(ids, _EntryRows(self.bank_, extra))
        with self.timings.measure("decode"):
            valid, beta = ids >= 0, search.temperature
            width = self.bank_.label_spec.value_dim
            values, extra = fetched[..., :width], fetched[..., width:]
            if index.exact_scores:
                q_norms = torch.linalg.vector_norm(queries.to(torch.float32), dim=-1)  # (Q,)
                cosines = sims / (q_norms[:, None] * extra[..., 0]).clamp_min(1e-12)
                weights = softmax_over_neighbours(cosines.masked_fill(~valid, 0.0), beta, valid)
            else:
                weights = neighbour_attention(queries, extra, beta, valid)
            return weights, values

    def _key_norms(self) -> torch.Tensor:
        """``(N,)`` float32 norms of the stored keys (1 up to their storage rounding)."""
        if self.key_norms_ is None:  # reset whenever the bank's keys change
            self.key_norms_ = self.bank_.key_norms()
        return self.key_norms_

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the memory bank to a folder: its manifest records the bank spec it was
        built with and the search settings of ``fit``, never later changes."""
        self._check_fitted()
        path = self.bank_.save(path, overwrite=overwrite)
        # keep the built index where the next load looks for it (keyed like a fresh build)
        empty = self._empty_index()
        if empty.kind == self.index_.kind != "exact" and self.index_.ntotal == len(self.bank_):
            source = content_id(MemoryBank.read_manifest(path))
            self.index_.save(cache_path(path / INDEX_CACHE, source, empty))
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        encoder: str | Encoder | None = None,
        weights: str | Path | None = None,
        progress: bool = True,
        **search: Any,
    ) -> InContextPredictor:
        """Rebuild a predictor from a bank folder; refuses a bank made with another encoder.

        Args:
            encoder, weights: where to find the encoder the bank was built with (default:
                the recorded name and weights file); checked against the bank's encoder.
            **search: :class:`SearchConfig` fields that replace the bank's recorded search
                settings (``k``, ``temperature``, ``index``, ``index_params``, ``device``,
                ``batch_size``). A :class:`BankSpec` field cannot change: rebuild the bank.
        """
        manifest = MemoryBank.read_manifest(path)
        spec, recorded = split_stored_config(
            manifest.get("config", {}), manifest.get("search"), f"{path}/manifest.json"
        )
        _check_search_overrides(search, spec, path)
        if weights is not None:
            spec = replace(spec, weights=str(weights))
        predictor = cls._from_spec(spec, encoder, progress, {**recorded, **search})
        if predictor.search.shard_bank:  # this rank's slice of the entries
            entries = manifest["counts"]["entries"]
            rows = slice_bounds(entries, distributed.rank(), distributed.world_size())
        predictor.bank_ = MemoryBank.load(  # keys stay on disk unless the index needs them
            path,
            encoder=predictor.encoder_.identity(),
            feature_dim=predictor.extractor_.feature_dim,
            keys=False,
            rows=rows if predictor.search.shard_bank else None,
        )
        predictor._attach(predictor.bank_, str(path))
        if predictor.search.shard_bank:
            predictor._build_index()  # each rank indexes its slice (not kept in the bank)
            predictor.index_ = ShardedIndex(predictor.index_, rows[0], entries)
        else:
            predictor._build_index(Path(path))
        return predictor

    @classmethod
    def from_bank(
        cls,
        bank: MemoryBank,
        encoder: str | Encoder | None = None,
        progress: bool = True,
        **search: Any,
    ) -> InContextPredictor:
        """A predictor over an in-memory bank (e.g. one built by a script), index built."""
        spec, recorded = split_stored_config(bank.config, bank.search, "the bank's config")
        _check_search_overrides(search, spec, "this bank")
        predictor = cls._from_spec(spec, encoder, progress, {**recorded, **search})
        bank.check_encoder(predictor.encoder_.identity(), predictor.extractor_.feature_dim)
        predictor.bank_ = bank
        predictor._attach(bank, "this bank")
        predictor._build_index()
        return predictor

    @classmethod
    def _from_spec(
        cls, spec: BankSpec, encoder: str | Encoder | None, progress: bool, search: dict[str, Any]
    ) -> InContextPredictor:
        if isinstance(encoder, str):  # the identity check against the bank decides
            spec = replace(spec, encoder=encoder)
        params = {**spec.to_dict(), "layers": spec.layers, **search}
        params["encoder"] = encoder if encoder is not None else spec.encoder
        predictor = cls(**params, progress=progress)
        predictor._prepare(spec)
        return predictor

    def _attach(self, bank: MemoryBank, source: str) -> None:
        """Restore the extractor's fitted state from ``bank`` (checked against its record)."""
        recorded = bank.config.get("extractor")
        if recorded is not None and recorded != self.extractor_.identity():
            raise BankError(
                f"{source} was built with features {recorded}, but this hbird makes "
                f"{self.extractor_.identity()} from its settings; rebuild the bank"
            )
        try:
            self.extractor_.load_state(bank.attachments)
        except BankError as err:
            raise BankError(f"{source}: {err}") from None
        self.label_spec_ = bank.label_spec
        ids = bank.image_ids
        known = not bool((ids == UNKNOWN_IMAGE).any())
        self.image_ids_ = ids.unique().tolist() if known else None


def item_image(item: str) -> int:
    """The prompt image of a ``"epoch:image"`` memory item (:attr:`PromptPatches.item`)."""
    return int(item.rsplit(":", 1)[1])


class _EntryRows:
    """This rank's rows for :meth:`ShardedIndex.fetch`, read only where asked: entry
    ``j`` is its values (``(C,)``, gathered: sparse values stay sparse) then
    ``extra[j]`` (a key norm, or the key), float32."""

    def __init__(self, bank: MemoryBank, extra: torch.Tensor) -> None:
        self.bank, self.extra = bank, extra
        self.shape = (len(bank), bank.label_spec.value_dim + extra.shape[1])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.bank.gather_values(ids)
        return torch.cat([values, self.extra[ids].to(torch.float32)], dim=-1)


def _check_search_overrides(overrides: dict[str, Any], spec: BankSpec, source: Any) -> None:
    """Only search settings change on load; a bank setting names the rebuild."""
    for name, value in overrides.items():
        if name in BankSpec.field_names():
            raise BankError(
                f"{spell(name)} is a bank setting: {source} was built with "
                f"{spell(name, getattr(spec, name))}; to use {spell(name, value)} rebuild the "
                f"bank (hbird bank build ... or fit a new predictor)"
            )
        if name not in SearchConfig.field_names():
            raise TypeError(
                f"unknown search setting {name!r}; search settings: "
                f"{', '.join(SearchConfig.field_names())}"
            )
