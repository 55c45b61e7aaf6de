"""``ReCo``: references per class from retrieved archives, then zero-shot segmentation
(issue 11, steps 3-7).

>>> reco = ReCo(collection="coll/", encoder="test_vit", dense_clip="test_clip")
>>> reco.build(["road", "parking"], renames={"parking": "parking lot"})
>>> masks = reco.predict(images)       # (H, W) class ids at each image's own size
>>> reco.save("refs/"); ReCo.load("refs/")

For each class c (prompted by its rename): retrieve the top ``k`` collection images by
CLIP ``e_n · t_c``, resize and centre-crop them to ``image_size``, take the encoder's
normalised patch features and co-segment them (:mod:`hbird.zeroshot.cosegment`) with
pixel weights: language guidance ``σ(10 ⟨DenseCLIP, t_c⟩)`` and context elimination
``Π_q (1 − σ(⟨F, ref_q⟩ / τ))``. Context references are all computed first, from
archives without context elimination, so their order does not matter; a class that is
itself a context reuses its reference. Prediction: ``S_c = σ(⟨F(x), ref_c⟩)`` upsampled
to the image, times ``σ(10 ⟨DenseCLIP(x), t_c⟩)`` with dense inference; argmax.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hbird.decode import DensePrediction
from hbird.errors import InputError, check_format_version
from hbird.io.files import atomic_folder, has_file, save_tensors, write_json
from hbird.labelspec import LabelSpec
from hbird.zeroshot.clip.base import ClipModel, clip_resize_crop
from hbird.zeroshot.collection import IDENTITY_FIELDS, ImageCollection
from hbird.zeroshot.cosegment import (
    CHUNK_ROWS,
    class_scores,
    context_weights,
    cosegment,
    language_weights,
    upsample,
)
from hbird.zeroshot.templates import prompt_name, text_embeddings

FORMAT_VERSION = 1
META_FILE = "reco.json"
TENSORS_FILE = "references.safetensors"
DEFAULT_CONTEXTS = ("tree", "sky", "building", "road", "person")
DEFAULT_ENCODER = "deit_small_distilled_patch16_224"
INFERENCE_FIELDS = ("dense_inference", "query_size", "batch_size")
"""Settings :meth:`ReCo.load` may change: they are read at prediction time only."""


@dataclass(frozen=True)
class ReCoSettings:
    """Every ReCo parameter, with the paper's values as defaults.

    Attributes:
        k: archive size (images retrieved per class).
        image_size: side the archive images are resized and centre-cropped to.
        n_seeds: seed pixels per archive image (1-5 are best, supplement C.4).
        contexts: the context classes (supplement C.1); eliminated from every other class.
        context_temperature: ``τ_ctx``; 1 is the official code's (no temperature).
        context_elimination, language_guidance: the two pixel weightings of co-segmentation.
        dense_inference: multiply ``S_c`` by the DenseCLIP score at prediction.
        language_scale: the 10 in ``σ(10 ⟨DenseCLIP, t_c⟩)``.
        official_grid: reproduce Algorithm 1's column slice (images ``i … 2i``).
        chunk_rows: rows of ``A`` computed at once.
        layers: encoder blocks whose features are used (None: the last).
        query_size: short side queries are resized to before the encoder (None: ``image_size``).
        batch_size: images per encoder batch.

    No dense CRF: no CRF package (pydensecrf2, SimpleCRF) installs here (no wheels;
    the source build did not finish), so the paper's CRF step is not offered.
    """

    k: int = 50
    image_size: int = 224
    n_seeds: int = 1
    contexts: tuple[str, ...] = DEFAULT_CONTEXTS
    context_temperature: float = 1.0
    context_elimination: bool = True
    language_guidance: bool = True
    dense_inference: bool = True
    language_scale: float = 10.0
    official_grid: bool = False
    chunk_rows: int = CHUNK_ROWS
    layers: tuple[int, ...] | None = None
    query_size: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "contexts", tuple(self.contexts))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        for name in ("k", "image_size", "n_seeds", "chunk_rows", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ReCo setting {name} must be a positive integer, got {value!r}")
        if self.context_temperature <= 0:
            raise InputError(f"context_temperature must be > 0, got {self.context_temperature}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["contexts"] = list(self.contexts)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


@dataclass
class Archive:
    """What co-segmentation found for one class: ``ids (k,)`` collection images,
    ``seeds (k, n_seeds)`` flat patch indices, ``scores (k, h, w)`` (``s``)."""

    ids: torch.Tensor
    seeds: torch.Tensor
    scores: torch.Tensor
    reference: torch.Tensor = field(repr=False)


def dense_clip_scores(
    clip: ClipModel, text: torch.Tensor, image: torch.Tensor, size, scale: float = 10.0
) -> torch.Tensor:
    """``σ(scale · ⟨DenseCLIP(image), t_c⟩)`` for ``text (C, E)`` and one ``image (3, h, w)``
    in [0, 1], bilinearly resized to ``size`` → ``(C, H, W)``. Argmax over ``C`` is
    "DenseCLIP alone"."""
    x = image[None].to(clip.device)
    dense = clip.encode_dense(clip.normalize(x))  # (1, h', w', E)
    return torch.cat([language_weights(dense, t, tuple(size), scale) for t in text]).cpu()


def _encoder_spec(encoder, weights) -> dict[str, Any]:
    name = encoder if isinstance(encoder, str) else encoder.name
    return {"name": name, "weights": None if weights is None else str(Path(weights).resolve())}


def _make_encoder(encoder, weights, device):
    from hbird.encoders import create_encoder

    if not isinstance(encoder, str):
        return encoder
    return create_encoder(encoder, weights=weights, pretrained=weights is None, device=device)


def _make_clip(clip, weights, device, recorded: Mapping[str, Any] | None = None):
    """A ``ClipModel`` from an instance, a name, or (``clip=None``) a recorded identity."""
    from hbird.zeroshot.clip import create_clip

    if clip is not None and not isinstance(clip, str):
        return clip
    options: dict[str, Any] = {}
    if clip is None:
        if recorded is None:
            return None
        clip, source = recorded["name"], recorded.get("weights_source", "random")
        if weights is None and source.startswith("random:seed="):
            options["seed"] = int(source.split("=", 1)[1])
        elif weights is None and source == "random":
            options["pretrained"] = False
        elif weights is None:
            weights = source
    return create_clip(clip, weights, device=device, **options)


def _same(recorded: Mapping[str, Any], current: Mapping[str, Any], keys) -> bool:
    return all(recorded.get(k) == current.get(k) for k in keys)


class ReCo:
    """Zero-shot segmentation by retrieve and co-segment.

    Args:
        collection: an :class:`ImageCollection` or its folder (needed by :meth:`build`).
        encoder: an hbird encoder name or instance (the paper: DeiT-S/16 on Stylised ImageNet).
        weights: local weights for ``encoder`` (None: its published ones).
        dense_clip: the DenseCLIP CLIP (a ResNet, the paper: RN50x16), name or instance;
            None disables language guidance and dense inference.
        clip: the retrieval CLIP (default: recreated from the collection's record).
        **settings: :class:`ReCoSettings` fields.
    """

    def __init__(
        self,
        collection: ImageCollection | str | Path | None = None,
        encoder: Any = DEFAULT_ENCODER,
        weights: str | Path | None = None,
        dense_clip: Any = None,
        dense_clip_weights: str | Path | None = None,
        clip: Any = None,
        clip_weights: str | Path | None = None,
        device: str = "cpu",
        progress: bool = True,
        **settings: Any,
    ) -> None:
        unknown = set(settings) - {f.name for f in fields(ReCoSettings)}
        if unknown:
            names = ", ".join(f.name for f in fields(ReCoSettings))
            raise InputError(f"ReCo has no setting {', '.join(sorted(unknown))}; it takes {names}")
        self.settings = ReCoSettings(**settings)
        self.device, self.progress = device, progress
        if isinstance(collection, (str, Path)):
            collection = ImageCollection.load(collection)
        self.collection = collection
        self.encoder_spec = _encoder_spec(encoder, weights)
        self.encoder = _make_encoder(encoder, weights, device)
        if self.settings.image_size % self.encoder.patch_size:
            raise InputError(
                f"image_size {self.settings.image_size} is not a multiple of the encoder's patch "
                f"size {self.encoder.patch_size}; choose e.g. "
                f"{self.settings.image_size // self.encoder.patch_size * self.encoder.patch_size}"
            )
        recorded = collection.clip_identity if collection is not None else None
        self.clip = _make_clip(clip, clip_weights, device, recorded)
        if collection is not None and self.clip is not None:
            collection.check_clip(self.clip)
        self.dense_clip = _make_clip(dense_clip, dense_clip_weights, device)
        if self.dense_clip is not None and not self.dense_clip.has_dense:
            raise InputError(
                f"dense_clip {self.dense_clip.name} has no dense (MaskCLIP) path; use a CLIP "
                "ResNet such as RN50x16, or dense_clip=None"
            )
        self.classes: list[str] = []
        self.renames: dict[str, str] = {}
        self.references: torch.Tensor | None = None  # (C, D)
        self.text_dense: torch.Tensor | None = None  # (C, E)
        self.archives: dict[str, Archive] = {}  # by prompt
        self.context_references = torch.empty(0)

    # -- features ---------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder-ready ``(B, 3, H, W)`` in [0, 1] → ``(B, h, w, D)`` normalised features."""
        out = []
        dev = torch.device(self.device)
        for start in range(0, len(images), self.settings.batch_size):
            batch = images[start : start + self.settings.batch_size].to(dev)
            with torch.no_grad():
                f = self.encoder.forward_patches(
                    self.encoder.normalize(batch), self.settings.layers
                )
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    def _archive_crops(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.settings.image_size
        return torch.stack(
            [clip_resize_crop(self.collection.load_image(int(i)), size) for i in ids]
        )

    def _language(self, crops: torch.Tensor, text: torch.Tensor, size) -> torch.Tensor:
        dense = []
        for start in range(0, len(crops), self.settings.batch_size):
            batch = crops[start : start + self.settings.batch_size]
            batch = batch.to(self.dense_clip.device)
            dense.append(self.dense_clip.encode_dense(self.dense_clip.normalize(batch)).cpu())
        return language_weights(torch.cat(dense), text, size, self.settings.language_scale)

    def _cosegment_class(
        self, prompt: str, t_retrieval, t_dense, contexts: torch.Tensor | None
    ) -> Archive:
        s = self.settings
        ids = self.collection.retrieve(t_retrieval, s.k, what=f"class {prompt!r}")
        crops = self._archive_crops(ids)
        feats = self.features(crops)  # (k, h, w, D)
        weights = torch.ones(feats.shape[:3])
        if s.language_guidance and self.dense_clip is not None:
            weights = weights * self._language(crops, t_dense, feats.shape[1:3])
        if contexts is not None and len(contexts):
            weights = weights * context_weights(feats, contexts, s.context_temperature)
        result = cosegment(feats, weights, s.n_seeds, s.chunk_rows, s.official_grid)
        return Archive(ids, result.seeds, result.scores, result.reference)

    # -- building ---------------------------------------------------------------------
    def build(self, classes: Sequence[str], renames: Mapping[str, str] | None = None) -> ReCo:
        """A reference per class (prompted by its rename, if any); returns ``self``."""
        if self.collection is None or self.clip is None:
            raise InputError("ReCo.build needs collection= (an ImageCollection or its folder)")
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes):
            raise InputError(f"classes must be a non-empty list of distinct names, got {classes}")
        renames = dict(renames or {})
        stray = sorted(set(renames) - set(classes))
        if stray:
            raise InputError(f"renames name classes that are not in the list: {', '.join(stray)}")
        s = self.settings
        prompts = [prompt_name(c, renames) for c in classes]
        contexts = list(s.contexts) if s.context_elimination else []
        wanted = list(dict.fromkeys(contexts + prompts))
        t_retrieval = dict(zip(wanted, text_embeddings(self.clip, wanted).cpu()))
        t_dense = (
            dict(zip(wanted, text_embeddings(self.dense_clip, wanted).cpu()))
            if self.dense_clip is not None
            else dict.fromkeys(wanted)
        )
        bar = tqdm(
            total=len(wanted), desc="ReCo references", unit="class", disable=not self.progress
        )
        archives: dict[str, Archive] = {}
        for q in contexts:  # all from un-eliminated archives: order-free
            archives[q] = self._cosegment_class(q, t_retrieval[q], t_dense[q], None)
            bar.update(1)
        context_refs = (
            torch.stack([archives[q].reference for q in contexts]) if contexts else torch.empty(0)
        )
        for p in prompts:
            if p not in archives:
                archives[p] = self._cosegment_class(p, t_retrieval[p], t_dense[p], context_refs)
                bar.update(1)
        bar.close()
        self.classes, self.renames, self.archives = classes, renames, archives
        self.context_references = context_refs
        self.references = torch.stack([archives[p].reference for p in prompts])
        self.text_dense = (
            torch.stack([t_dense[p] for p in prompts]) if self.dense_clip is not None else None
        )
        return self

    @property
    def prompts(self) -> list[str]:
        return [prompt_name(c, self.renames) for c in self.classes]

    # -- prediction -------------------------------------------------------------------
    def _check_built(self) -> None:
        if self.references is None:
            raise InputError("ReCo has no references yet: call build(classes) or ReCo.load(folder)")

    def scores(self, image: torch.Tensor) -> torch.Tensor:
        """One ``(3, H, W)`` image in [0, 1] → ``(C, H, W)`` class scores at its size."""
        from hbird.data.transforms import resize_for_encoder

        self._check_built()
        s = self.settings
        size = tuple(image.shape[-2:])
        x = resize_for_encoder(image.float(), s.query_size or s.image_size, self.encoder.patch_size)
        scores = upsample(class_scores(self.features(x[None])[0], self.references), size)
        if s.dense_inference and self.dense_clip is not None:
            scores = scores * dense_clip_scores(
                self.dense_clip, self.text_dense, x, size, s.language_scale
            )
        return scores

    def predict(self, images) -> list[torch.Tensor]:
        """Images (a list of ``(3, H, W)`` or a ``(B, 3, H, W)`` batch, in [0, 1]) → one
        ``(H, W)`` int64 map of class ids (indices into ``classes``) per image."""
        return [self.scores(image).argmax(0) for image in images]

    def predict_dense(self, images) -> list[DensePrediction]:
        """As :meth:`predict`, with the winning score as the confidence and the
        ``(H, W, C)`` scores (what scoring loops and overlays take)."""
        out = []
        for image in images:
            scores = self.scores(image)
            confidence, labels = scores.max(0)
            out.append(DensePrediction(labels, confidence, scores.permute(1, 2, 0)))
        return out

    @property
    def label_spec(self) -> LabelSpec:
        """Class ids are indices into :attr:`classes`; 255 is never predicted."""
        return LabelSpec(num_classes=len(self.classes), class_names=tuple(self.classes))

    # -- saving -----------------------------------------------------------------------
    def identities(self) -> dict[str, Any]:
        return {
            "encoder": {**self.encoder.identity(), **self.encoder_spec},
            "clip": self.clip.identity() if self.clip is not None else None,
            "dense_clip": self.dense_clip.identity() if self.dense_clip is not None else None,
            "collection": self.collection.identity() if self.collection is not None else None,
        }

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``reco.json`` (classes, renames, contexts, settings, identities) and
        ``references.safetensors`` atomically into ``folder``."""
        self._check_built()
        prompts = self.prompts
        tensors = {
            "references": self.references,
            "context_references": self.context_references.reshape(-1, self.references.shape[1]),
            "archive_ids": torch.stack([self.archives[p].ids for p in prompts]),
            "seeds": torch.stack([self.archives[p].seeds for p in prompts]),
            "seed_scores": torch.stack([self.archives[p].scores for p in prompts]),
        }
        if self.text_dense is not None:
            tensors["text_dense"] = self.text_dense
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "renames": self.renames,
            "prompts": prompts,
            "settings": self.settings.to_dict(),
            "identities": self.identities(),
        }
        with atomic_folder(folder, "saved ReCo references", has_file(META_FILE), overwrite) as tmp:
            save_tensors(tmp / TENSORS_FILE, tensors)
            write_json(tmp / META_FILE, meta)
        return Path(folder)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        encoder: Any = None,
        weights: str | Path | None = None,
        dense_clip: Any = None,
        dense_clip_weights: str | Path | None = None,
        collection: ImageCollection | str | Path | None = None,
        clip: Any = None,
        device: str = "cpu",
        progress: bool = True,
        **inference: Any,
    ) -> ReCo:
        """Reopen saved references. Models not given are recreated from the record; any
        given (or recreated) one whose identity differs from the record is refused.
        ``inference`` may change the prediction-time settings (``INFERENCE_FIELDS``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            raise InputError(
                f"{folder} holds no saved ReCo references ({META_FILE} is missing); "
                "write them with `hbird zeroshot build --out` or ReCo.save"
            )
        meta = json.loads(meta_file.read_text())
        check_format_version(meta.get("format_version"), FORMAT_VERSION, meta_file, InputError)
        bad = sorted(set(inference) - set(INFERENCE_FIELDS))
        if bad:
            raise InputError(
                f"{', '.join(bad)} cannot change on load (the references were built with "
                f"them); only {', '.join(INFERENCE_FIELDS)} can"
            )
        ids = meta["identities"]
        settings = {k: v for k, v in meta["settings"].items()}
        settings.update(inference)
        spec = ids["encoder"]
        reco = cls.__new__(cls)
        reco.settings = replace(ReCoSettings(), **settings)
        reco.device, reco.progress = device, progress
        reco.encoder_spec = {"name": spec["name"], "weights": spec.get("weights")}
        reco.encoder = _make_encoder(
            spec["name"] if encoder is None else encoder,
            weights if weights is not None or encoder is not None else spec.get("weights"),
            device,
        )
        fields_ = ("name", "config_hash", "weights_hash", "mean", "std")
        if not _same(spec, reco.encoder.identity(), fields_):
            current = reco.encoder.identity()
            raise InputError(
                f"{folder} was built with encoder {spec['name']} (weights {spec['weights_hash']}) "
                f"but the encoder in use is {current['name']} (weights {current['weights_hash']}); "
                "use the same encoder and weights, or build the references again"
            )
        reco.dense_clip = None
        if ids["dense_clip"] is not None or dense_clip is not None:
            reco.dense_clip = _make_clip(dense_clip, dense_clip_weights, device, ids["dense_clip"])
            _refuse_clip(ids["dense_clip"], reco.dense_clip, folder, "dense_clip")
        reco.clip = None
        if clip is not None:
            reco.clip = _make_clip(clip, None, device)
            _refuse_clip(ids["clip"], reco.clip, folder, "clip")
        reco.collection = None
        if collection is not None:
            if isinstance(collection, (str, Path)):
                collection = ImageCollection.load(collection)
            recorded, current = ids["collection"] or {}, collection.identity()
            same_clip = _same(recorded.get("clip") or {}, current["clip"], IDENTITY_FIELDS)
            if current["content_id"] != recorded.get("content_id") or not same_clip:
                raise InputError(
                    f"{folder} was built from collection {(ids['collection'] or {}).get('path')} "
                    f"but {collection.path} holds other images or embeddings, or another CLIP's; "
                    "use the same "
                    "collection, or build the references again"
                )
            reco.collection = collection
        tensors = load_file(str(folder / TENSORS_FILE))
        reco.classes, reco.renames = list(meta["classes"]), dict(meta["renames"])
        reco.references = tensors["references"]
        reco.text_dense = tensors.get("text_dense")
        reco.context_references = tensors["context_references"]
        reco.archives = {
            p: Archive(
                tensors["archive_ids"][i],
                tensors["seeds"][i],
                tensors["seed_scores"][i],
                tensors["references"][i],
            )
            for i, p in enumerate(meta["prompts"])
        }
        reco._recorded = ids
        return reco


def _refuse_clip(recorded, clip, folder: Path, what: str) -> None:
    current = clip.identity() if clip is not None else None
    if recorded is None or current is None or not _same(recorded, current, IDENTITY_FIELDS):
        raise InputError(
            f"{folder} was built with {what} "
            f"{recorded and recorded.get('name')} (weights {recorded and recorded.get('weights_hash')}) "
            f"but the {what} in use is {current and current.get('name')} "
            f"(weights {current and current.get('weights_hash')}); use the same CLIP and "
            "weights, or build the references again"
        )
