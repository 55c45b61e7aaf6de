"""ReCo+ (Shin et al. 2022, sec. 4.2 and supplementary B.4): a student trained on ReCo's
pseudo-labels.

1. :func:`pseudo_label` runs a teacher (``ReCo.predict`` or any callable ``(3, H, W)
   image → (H, W) label ids``) over a dataset's train split and writes one label PNG per
   image (resumable: written labels are kept).
2. :func:`split_heldout` sets a seeded share of the pseudo-labelled images aside.
   Checkpoints are selected on them — on pseudo-labels, never on ground truth (the
   official code selects on validation ground truth).
3. :class:`PlusTrainer` trains a student (:data:`STUDENTS`) with cross-entropy (255
   ignored), Adam with the backbone at a tenth of the learning rate, weight decay and a
   poly schedule, under the supplementary's augmentations (:class:`PairAugmentation`).

The defaults are the paper's (:data:`PRESETS` ``"paper"``): 20k iterations, batch 8,
Adam 5e-4 (backbone × 0.1), weight decay 2e-4, poly 0.9, random scale 0.5–2, crop 320,
horizontal flip, ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, Gaussian blur with a kernel
of 10% of the short side. The paper's student is DeepLabv3+ with a ResNet-101; torchvision
has DeepLabv3 (no decoder), which is what ``deeplabv3_resnet101`` builds. The paper does
not give the blur's probability or sigma; they are 0.5 and (0.1, 2.0) here
(torchvision's ``GaussianBlur`` sigma range).

A run folder holds ``config.json``, ``metrics.jsonl`` (loss and held-out pseudo-label
mIoU), ``student.safetensors`` (the best student on the held-out split, loadable with
:func:`load_student`) and ``trainer_state.safetensors`` (to resume; the format of
:mod:`hbird.pretrain.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from tqdm.auto import tqdm

from hbird.data.datasets import DenseDataset, Sample
from hbird.data.transforms import resize_image, resize_label
from hbird.errors import InputError, spell
from hbird.io.files import save_tensors, write_json
from hbird.io.images import load_mask, save_label_png
from hbird.io.seeds import make_generator
from hbird.labelspec import LabelSpec
from hbird.memory.augment import crop_or_pad
from hbird.metrics.segmentation import SegmentationScores
from hbird.pretrain import checkpoint as ckpt
from hbird.pretrain.augment import ViewSpec, blur_kernel, colour_jitter
from hbird.pretrain.schedule import poly
from hbird.registry import Registry

Teacher = Callable[[torch.Tensor], torch.Tensor]
"""``(3, H, W)`` image in [0, 1] → ``(H, W)`` int64 label ids (255 = no label)."""

STUDENT_NAME = "student.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- pseudo-labels


class PseudoLabelled(DenseDataset):
    """A dataset's images with the pseudo-labels in ``folder/<name>.png`` as labels.

    Args:
        source: the images (its own labels are never read).
        folder: one label PNG per image, as :func:`pseudo_label` writes them.
        label_spec: the classes the labels hold.
    """

    def __init__(self, source: DenseDataset, folder: str | Path, label_spec: LabelSpec) -> None:
        self.source, self.folder = source, Path(folder)
        super().__init__(range(len(source)), label_spec, f"pseudo-labels in {self.folder}")

    def _name(self, item: int) -> str:
        return self.source.names[item]

    def _load(self, item: int) -> Sample:
        sample = self.source[item]
        path = self.folder / f"{sample.name}.png"
        if not path.is_file():
            raise InputError(f"pseudo-label {path} is missing; run pseudo_label() on this folder")
        return Sample(sample.name, sample.image, load_mask(path), sample.image_path, path)


def pseudo_label(
    dataset: DenseDataset,
    teacher: Teacher,
    folder: str | Path,
    label_spec: LabelSpec | None = None,
    progress: bool = True,
) -> PseudoLabelled:
    """Label every image of ``dataset`` with ``teacher``; labels already in ``folder`` are kept.

    Each label is written atomically, so an interrupted run resumes where it stopped.

    Raises:
        InputError: the teacher returned the wrong size or ids outside the classes.
    """
    spec = label_spec or dataset.label_spec
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = dataset.names
    todo = [i for i, name in enumerate(names) if not (folder / f"{name}.png").is_file()]
    for i in tqdm(todo, desc="pseudo-labelling", unit="img", disable=not progress):
        sample = dataset[i]
        with torch.no_grad():
            label = torch.as_tensor(teacher(sample.image)).to(torch.int64)
        if tuple(label.shape) != tuple(sample.image.shape[-2:]):
            raise InputError(
                f"the teacher returned a {tuple(label.shape)} label for image {sample.name} of "
                f"size {tuple(sample.image.shape[-2:])}; it must label every pixel"
            )
        bad = (label < 0) | ((label >= spec.num_classes) & (label != spec.ignore_index))
        if bool(bad.any()):
            raise InputError(
                f"the teacher labelled {sample.name} with ids {label[bad].unique()[:5].tolist()} "
                f"outside 0..{spec.num_classes - 1} (and {spec.ignore_index} for no label)"
            )
        save_label_png(folder / f"{sample.name}.png", label)
    return PseudoLabelled(dataset, folder, spec)


def split_heldout(
    dataset: DenseDataset, fraction: float, seed: int = 0
) -> tuple[DenseDataset, DenseDataset]:
    """``(train, heldout)``: a seeded ``fraction`` of the images (at least one) held out."""
    n = len(dataset)
    if n < 2 or not 0 < fraction < 1:
        raise InputError(
            f"holding out {fraction} of {n} pseudo-labelled images leaves nothing to train or "
            "select on; give 0 < heldout fraction < 1 and at least 2 images"
        )
    order = torch.randperm(n, generator=make_generator(seed, "plus", "heldout")).tolist()
    count = min(n - 1, max(1, round(n * fraction)))
    return dataset.subset(sorted(order[count:])), dataset.subset(sorted(order[:count]))


# --------------------------------------------------------------------------- augmentation


PAPER_COLOUR = ViewSpec(
    320, jitter=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur=0.5
)
"""Supplementary B.4's photometric part: ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8 and a
Gaussian blur (p 0.5, sigma in (0.1, 2.0): the paper gives neither). Only its jitter and
blur fields are read."""


@dataclass(frozen=True)
class PairAugmentation:
    """Supplementary B.4: the same geometry on image and label, colour on the image only.

    Random scale in ``scale`` (bilinear image, nearest label), a random ``crop``-square
    crop (padded with black and ``ignore_index`` where the scaled image is smaller),
    a horizontal flip with probability ``flip``; then the colour jitter of ``colour``
    with probability ``colour.jitter`` and a Gaussian blur with probability
    ``colour.blur`` (kernel 10% of the crop's short side, sigma in ``colour.blur_sigma``).
    """

    crop: int = 320
    scale: tuple[float, float] = (0.5, 2.0)
    flip: float = 0.5
    colour: ViewSpec = PAPER_COLOUR

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, ignore_index: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` in [0, 1], ``(H, W)`` int64 → ``(3, crop, crop)``, ``(crop, crop)``."""
        s = _uniform(gen, self.scale)
        height, width = image.shape[-2:]
        size = (max(1, round(height * s)), max(1, round(width * s)))
        image, label = resize_image(image, size), resize_label(label, size)
        image, label = crop_or_pad(image, label, (self.crop, self.crop), ignore_index, gen)
        if float(torch.rand((), generator=gen)) < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        if float(torch.rand((), generator=gen)) < self.colour.jitter:
            image = colour_jitter(image, self.colour, gen).clamp(0.0, 1.0)
        if float(torch.rand((), generator=gen)) < self.colour.blur:
            sigma = _uniform(gen, self.colour.blur_sigma)
            kernel = blur_kernel(self.crop, self.crop)
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        return image, label


def _uniform(gen: torch.Generator, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(torch.rand((), generator=gen))


class AugmentedPairs(torch.utils.data.Dataset):
    """Training sample ``g`` (the ``g``-th drawn in the run, across epochs): an image of
    ``dataset`` in a seeded epoch order, augmented by a generator of ``(seed, g)`` only, so
    a resumed run (or any number of data-loader workers) draws the same batches."""

    def __init__(self, dataset: DenseDataset, augment: PairAugmentation, seed: int) -> None:
        self.dataset, self.augment, self.seed = dataset, augment, seed
        self.ignore_index = int(dataset.label_spec.ignore_index or 255)

    def image_index(self, g: int) -> int:
        epoch, position = divmod(g, len(self.dataset))
        gen = make_generator(self.seed, "plus", "order", epoch)
        return int(torch.randperm(len(self.dataset), generator=gen)[position])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[self.image_index(g)]
        gen = make_generator(self.seed, "plus", "augment", g)
        return self.augment(sample.image, sample.label, self.ignore_index, gen)


def reco_teacher(refs: str | Path, dataset: DenseDataset, device: str | None = None) -> Teacher:
    """``ReCo.load(refs)`` as a teacher of ``dataset``'s label ids: predicted over the
    dataset's vocabulary (:func:`hbird.data.vocabulary.vocabulary_of`), then mapped."""
    from hbird.data.vocabulary import vocabulary_of
    from hbird.zeroshot.reco import ReCo

    reco = ReCo.load(refs, device=device or "cpu")
    vocabulary = vocabulary_of(dataset)
    if tuple(reco.classes) != tuple(vocabulary.names):
        raise InputError(
            f"{spell('refs')} {refs} were built for the classes {list(reco.classes)[:6]}..., but "
            f"{dataset!r} is predicted over {list(vocabulary.names)[:6]}...; build the "
            "references with the dataset's class names (in its order)"
        )
    return lambda image: vocabulary.to_labels(reco.predict([image])[0])


# --------------------------------------------------------------------------- students


class Student(nn.Module):
    """A segmentation network: normalised ``(B, 3, H, W)`` → logits ``(B, C, H, W)``.

    ``backbone`` holds what trains at ``backbone_lr_scale`` of the learning rate,
    ``head`` the rest; ``mean``/``std`` are the input normalisation.
    """

    backbone: nn.Module
    head: nn.Module
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` in [0, 1] → ``(H, W)`` int64 class ids (whole image, one pass)."""
        self.eval()
        device = next(self.parameters()).device
        x = self.normalize(image[None].to(device, torch.float32))
        return self(x)[0].argmax(0).cpu()


class DeepLabStudent(Student):
    """torchvision ``deeplabv3_resnet101`` (random weights; ``weights_backbone`` = a local
    ImageNet ResNet-101 state dict file, e.g. torchvision's ``resnet101-*.pth``)."""

    def __init__(self, num_classes: int, weights_backbone: str | None = None) -> None:
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet101

        model = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=num_classes)
        if weights_backbone is not None:
            path = Path(str(weights_backbone)).expanduser()
            if not path.is_file():
                raise InputError(f"weights_backbone {path} does not exist; give a local file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = model.backbone.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise InputError(
                    f"{path} is not a ResNet-101 state dict (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}); give torchvision's resnet101 weights"
                )
        self.backbone, self.head = model.backbone, model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x)["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ViTStudent(Student):
    """Any timm ViT (built as for pretraining, :func:`hbird.pretrain.backbone.build_backbone`)
    with a small convolutional head on its patch tokens, upsampled to the input."""

    def __init__(
        self,
        num_classes: int,
        arch: str = "vit_small_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        init_weights: str | None = None,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        from hbird.pretrain.backbone import build_backbone

        self.backbone = build_backbone(arch, model_kwargs, init_weights, seed=0)
        self.mean, self.std = tuple(self.backbone.mean), tuple(self.backbone.std)
        self.head = _conv_head(self.backbone.embed_dim, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.backbone(x).patches.permute(0, 3, 1, 2)  # (B, D, h, w)
        return F.interpolate(self.head(patches), size=x.shape[-2:], mode="bilinear")


class TinyStudent(Student):
    """A three-layer CNN (stride 2, ~10k parameters) for tests and CPU runs."""

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _conv_bn(3, width, stride=1),
            _conv_bn(width, width, stride=2),
            _conv_bn(width, width, dilation=2),
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear")


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_head(cin: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(cin, hidden), nn.Conv2d(hidden, num_classes, 1))


STUDENTS: Registry[Any] = Registry("student")
STUDENTS.register("deeplabv3_resnet101", DeepLabStudent)
STUDENTS.register("vit", ViTStudent)
STUDENTS.register("tiny", TinyStudent)


def create_student(name: str, num_classes: int, options: dict[str, Any] | None = None) -> Student:
    """A registered student with ``num_classes`` outputs, seeded (the same on every call)."""
    factory = STUDENTS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return factory(num_classes, **(options or {}))
        except TypeError as err:
            raise InputError(f"bad student options {options} for {name!r}: {err}") from None


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """The student saved by :class:`PlusTrainer` (``student.safetensors``)."""
    from safetensors.torch import load_file

    from hbird.io.checkpoints import read_metadata

    meta = read_metadata(path)
    if meta.get("format") != "hbird-plus-student-1":
        raise InputError(f"{path} is not a ReCo+ student (format {meta.get('format')!r})")
    student = create_student(
        meta["student"], int(meta["num_classes"]), json.loads(meta["student_options"])
    )
    student.load_state_dict(load_file(str(path)))
    return student.to(device).eval()


def score_student(
    student: Student, dataset: DenseDataset, progress: bool = False
) -> SegmentationScores:
    """The student's scores (mIoU, pixel accuracy, per-class IoU) against ``dataset``'s
    labels, one whole image at a time, through :func:`hbird.eval.scoring.score_queries`."""
    from hbird.eval.scoring import new_metric, score_queries

    predict = lambda images: [student.predict(image) for image in images]  # noqa: E731
    metric = new_metric(dataset.label_spec)
    return score_queries(predict, dataset, metric, batch_size=1, progress=progress).metric.compute()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class PlusConfig:
    """Every setting of a ReCo+ run; the defaults are the paper's (supplementary B.4).

    Attributes:
        student, student_options: a :data:`STUDENTS` name and its options.
        iterations, batch_size: optimizer steps and images per step.
        lr, backbone_lr_scale, weight_decay, poly_power: Adam at ``lr`` (the backbone at
            ``lr · backbone_lr_scale``), L2 weight decay, ``lr · (1 − t/T)^poly_power``.
        augment: :class:`PairAugmentation` fields.
        heldout_fraction: share of the pseudo-labelled images checkpoints are selected on.
        eval_every, save_every: steps between held-out evaluations / resumable saves
            (both also at the end).
        num_workers: data-loader workers. seed: everything random. device: ``None`` =
            ``cuda`` if available. resume: continue the run in ``out``.
    """

    student: str = "deeplabv3_resnet101"
    student_options: dict[str, Any] = field(default_factory=dict)
    iterations: int = 20000
    batch_size: int = 8
    lr: float = 5e-4
    backbone_lr_scale: float = 0.1
    weight_decay: float = 2e-4
    poly_power: float = 0.9
    augment: dict[str, Any] = field(default_factory=dict)
    heldout_fraction: float = 0.05
    eval_every: int = 1000
    save_every: int = 1000
    num_workers: int = 4
    seed: int = 0
    device: str | None = None
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, PlusConfig] = {
    "paper": PlusConfig(),
    "tiny": PlusConfig(
        student="tiny",
        iterations=150,
        batch_size=8,
        lr=1e-2,
        augment={"crop": 48},
        heldout_fraction=0.2,
        eval_every=50,
        save_every=50,
        num_workers=0,
    ),
}
"""``paper``: supplementary B.4. ``tiny``: the CPU/test setting — the three-layer
:class:`TinyStudent`, 150 iterations, crop 48, lr 1e-2 (a small net from scratch), a fifth
held out. On the toy world of ``tests/test_zeroshot_plus.py`` (48 scenes of 48 pixels, a
noisy-oracle teacher at 0.659 mIoU) the student reaches 0.891 mIoU on held-out scenes in
about a minute on a loaded 2-core CPU (0.924 with 300 iterations). Its fidelity cost
against the paper's student is not measurable on a CPU (that student does not train
there in useful time)."""


class PlusTrainer:
    """Train a student on ``train`` (pseudo-labelled), selecting on ``heldout``.

    Args:
        config: the run's settings.
        train, heldout: pseudo-labelled datasets (e.g. from :func:`split_heldout`).
        out: run folder.
        progress: show a progress bar (with ETA).
    """

    def __init__(
        self,
        config: PlusConfig,
        train: DenseDataset,
        heldout: DenseDataset,
        out: str | Path,
        progress: bool = True,
    ) -> None:
        if config.iterations < 1 or config.batch_size < 1 or config.lr <= 0:
            raise InputError("iterations and batch_size must be >= 1 and lr > 0")
        self.config, self.train, self.heldout = config, train, heldout
        self.out, self.progress = Path(out), progress
        self.spec = train.label_spec
        self.device = torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.student = create_student(
            config.student, self.spec.num_classes, config.student_options
        ).to(self.device)
        base = [p for p in self.student.head.parameters()]
        back = [p for p in self.student.backbone.parameters()]
        self.optimizer = torch.optim.Adam(
            [
                {"params": back, "scale": config.backbone_lr_scale},
                {"params": base, "scale": 1.0},
            ],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        try:
            augment = PairAugmentation(**config.augment)
        except TypeError as err:
            raise InputError(f"bad augmentation options {config.augment}: {err}") from None
        self.pairs = AugmentedPairs(train, augment, config.seed)
        self.step, self.best_miou, self.best_step = 0, -1.0, -1

    def learning_rate(self, step: int) -> float:
        return poly(step, self.config.iterations, self.config.lr, self.config.poly_power)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from the current step on (sample ``g = step · batch + j``)."""
        b = self.config.batch_size
        order = range(self.step * b, self.config.iterations * b)
        workers = self.config.num_workers
        loader = torch.utils.data.DataLoader(
            self.pairs, batch_size=b, sampler=order, num_workers=workers, drop_last=True
        )
        yield from loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.student.train()
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        x = self.student.normalize(images.to(self.device))
        logits = self.student(x)
        ignore = int(self.spec.ignore_index if self.spec.ignore_index is not None else 255)
        loss = F.cross_entropy(logits, labels.to(self.device), ignore_index=ignore)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {self.step}; lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def evaluate(self, dataset: DenseDataset | None = None) -> float:
        """mIoU of the student against ``dataset``'s labels (default: the held-out
        pseudo-labels)."""
        return score_student(self.student, self.heldout if dataset is None else dataset).miou

    def fit(self) -> dict[str, Any]:
        """Train to ``iterations``; returns ``{"step", "best_miou", "best_step"}``."""
        cfg = self.config
        self._maybe_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", cfg.to_dict())
        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            desc="ReCo+ student",
            unit="it",
            disable=not self.progress,
        )
        start = time.perf_counter()
        for images, labels in self.batches():
            loss = self.train_step(images, labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", best=f"{self.best_miou:.3f}")
            done = self.step >= cfg.iterations
            record: dict[str, Any] = {"step": self.step, "loss": loss}
            if done or (cfg.eval_every and self.step % cfg.eval_every == 0):
                record["heldout_pseudo_miou"] = miou = self.evaluate()
                if miou > self.best_miou:
                    self.best_miou, self.best_step = miou, self.step
                    self._save_student()
            if "heldout_pseudo_miou" in record or self.step % 50 == 0:
                record["seconds"] = time.perf_counter() - start
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
            if done or (cfg.save_every and self.step % cfg.save_every == 0):
                self._save_state()
        bar.close()
        return {"step": self.step, "best_miou": self.best_miou, "best_step": self.best_step}

    # -- files ------------------------------------------------------------------------
    def _save_student(self) -> None:
        meta = {
            "format": "hbird-plus-student-1",
            "student": self.config.student,
            "student_options": json.dumps(self.config.student_options, sort_keys=True),
            "num_classes": str(self.spec.num_classes),
            "class_names": json.dumps(list(self.spec.class_names or ())),
            "step": str(self.step),
            "heldout_pseudo_miou": str(self.best_miou),
        }
        save_tensors(self.out / STUDENT_NAME, dict(self.student.state_dict()), meta)

    def _save_state(self) -> None:
        record = {**self.config.to_dict(), "best_miou": self.best_miou}
        record["best_step"] = self.best_step
        ckpt.save_state(self.student, self.optimizer, self.step, self.out / ckpt.STATE_NAME, record)

    def _maybe_resume(self) -> None:
        must_match = {"student": self.config.student}
        resumed = ckpt.resume_state(
            self.out, self.config.resume, self.student, self.optimizer, must_match, "ReCo+ run"
        )
        if resumed is not None:
            self.step, saved = resumed
            self.best_miou, self.best_step = float(saved["best_miou"]), int(saved["best_step"])


def train_plus(
    dataset: DenseDataset,
    teacher: Teacher,
    out: str | Path,
    config: PlusConfig | None = None,
    label_spec: LabelSpec | None = None,
    progress: bool = True,
) -> tuple[PlusTrainer, dict[str, Any]]:
    """The whole of ReCo+: pseudo-label ``dataset`` into ``out/pseudo_labels``, hold out a
    share, train the student; returns the trainer (its ``student`` is the last one; the
    best is ``out/student.safetensors``) and :meth:`PlusTrainer.fit`'s summary."""
    config = config or PlusConfig()
    out = Path(out)
    if (out / ckpt.STATE_NAME).exists() and not config.resume:
        raise InputError(
            f"{out} already holds a ReCo+ run; pass --resume to continue it or choose another --out"
        )
    labelled = pseudo_label(dataset, teacher, out / "pseudo_labels", label_spec, progress)
    train, heldout = split_heldout(labelled, config.heldout_fraction, config.seed)
    trainer = PlusTrainer(config, train, heldout, out, progress)
    return trainer, trainer.fit()


__all__: Sequence[str] = [
    "AugmentedPairs",
    "PRESETS",
    "PairAugmentation",
    "PlusConfig",
    "PlusTrainer",
    "PseudoLabelled",
    "STUDENTS",
    "Student",
    "create_student",
    "load_student",
    "pseudo_label",
    "reco_teacher",
    "score_student",
    "split_heldout",
    "train_plus",
]
