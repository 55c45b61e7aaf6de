"""ReCo+ (Shin et al. 2022, sec. 4.2; supplementary B.4): pseudo-labels, augmentation,
students, the poly schedule, resumable training and the toy-world acceptance test."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hbird.data import create_dataset
from hbird.data.datasets import DenseDataset, Sample
from hbird.errors import InputError
from hbird.metrics.segmentation import ConfusionMatrix
from hbird.pretrain.augment import ViewSpec, blur_kernel
from hbird.pretrain.schedule import poly
from hbird.zeroshot.plus import (
    PAPER_COLOUR,
    PRESETS,
    PairAugmentation,
    PlusConfig,
    PlusTrainer,
    create_student,
    load_student,
    pseudo_label,
    split_heldout,
    train_plus,
)

TOY = "synthetic:n={n}:seed={seed}:size=48:classes=4"


def test_poly_schedule_by_hand() -> None:
    """lr_t = base · (1 − t / T)^0.9 (the poly schedule of DeepLab)."""
    assert poly(0, 100, 5e-4, 0.9) == pytest.approx(5e-4)
    assert poly(50, 100, 1.0, 0.9) == pytest.approx(0.5**0.9)  # 0.53589...
    assert poly(75, 100, 2.0, 1.0) == pytest.approx(0.5)
    assert poly(100, 100, 1.0, 0.9) == 0.0


def test_blur_kernel_is_a_tenth_of_the_short_side() -> None:
    """Supplementary B.4: kernel 10% of min(H, W), made odd: 320 → 33, 375 x 1242 → 37."""
    assert blur_kernel(320, 320) == 33
    assert blur_kernel(375, 1242) == 37
    assert blur_kernel(16, 16) == 3


def _coordinate_pair(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose R and G channels spell each pixel's (y, x), and the label y·1000 + x."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([ys, xs, torch.zeros_like(ys)]).float() / 255.0
    return image, ys * 1000 + xs


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_pair_augmentation_moves_image_and_label_together(scale: float) -> None:
    """Same crop, flip and scale on both: at every labelled pixel the image's coordinates
    agree with the label's (exactly without scaling; within a pixel when resampled), and
    padded pixels are black with ignore labels."""
    image, label = _coordinate_pair(40, 60)
    plain = ViewSpec(48, jitter=0.0, blur=0.0)
    augment = PairAugmentation(crop=48, scale=(scale, scale), flip=0.5, colour=plain)
    flips = 0
    for seed in range(6):
        out_image, out_label = augment(image, label, 255, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
        valid = out_label != 255
        decoded = (out_image[:2] * 255).round().long()
        y, x = out_label // 1000, out_label % 1000
        tolerance = 0 if scale == 1.0 else 1
        assert bool(((decoded[0] - y).abs()[valid] <= tolerance).all())
        assert bool(((decoded[1] - x).abs()[valid] <= tolerance).all())
        assert bool((out_image[:, ~valid] == 0).all())
        if scale == 0.5:  # 20 x 30 inside a 48 crop: padded
            assert int(valid.sum()) == 20 * 30
        row = out_label[valid.any(1).nonzero()[0, 0]]
        xs = (row[row != 255] % 1000).tolist()
        flips += xs[0] > xs[-1]
    assert 0 < flips < 6  # some crops flipped, some not (p = 0.5)


def test_pair_augmentation_colour_changes_the_image_only() -> None:
    image, label = _coordinate_pair(48, 48)
    image = image.clone()
    image[2] = 0.5
    plain = PairAugmentation(48, (1.0, 1.0), 0.0, ViewSpec(48, jitter=0.0, blur=0.0))
    coloured = PairAugmentation(48, (1.0, 1.0), 0.0, replace(PAPER_COLOUR, jitter=1.0, blur=1.0))
    a_image, a_label = plain(image, label, 255, torch.Generator().manual_seed(0))
    b_image, b_label = coloured(image, label, 255, torch.Generator().manual_seed(0))
    assert torch.equal(a_label, label) and torch.equal(b_label, label)
    assert torch.equal(a_image, image) and not torch.allclose(b_image, image, atol=0.02)
    assert float(b_image.min()) >= 0.0 and float(b_image.max()) <= 1.0


def test_pseudo_label_writes_once_and_checks_the_teacher(tmp_path: Path) -> None:
    ds = create_dataset(TOY.format(n=3, seed=0))
    calls = []

    def teacher(image: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.full(image.shape[-2:], 2, dtype=torch.int64)

    labelled = pseudo_label(ds, teacher, tmp_path / "p", progress=False)
    assert len(calls) == 3 and labelled.names == ds.names
    assert torch.equal(labelled[1].label, torch.full((48, 48), 2))
    assert torch.equal(labelled[1].image, ds[1].image)
    pseudo_label(ds, teacher, tmp_path / "p", progress=False)  # resumed: nothing left to do
    assert len(calls) == 3
    with pytest.raises(InputError, match="outside 0..3"):
        pseudo_label(ds, lambda im: torch.full(im.shape[-2:], 7), tmp_path / "q", progress=False)
    with pytest.raises(InputError, match="label every pixel"):
        pseudo_label(ds, lambda im: torch.zeros(4, 4, dtype=torch.int64), tmp_path / "r")


def test_split_heldout_is_a_seeded_partition() -> None:
    ds = create_dataset(TOY.format(n=20, seed=0))
    train, held = split_heldout(ds, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train.names + held.names) == sorted(ds.names)
    assert split_heldout(ds, 0.25, seed=3)[1].names == held.names
    assert split_heldout(ds, 0.25, seed=4)[1].names != held.names
    with pytest.raises(InputError, match="heldout"):
        split_heldout(ds, 0.0)


def test_students_give_logits_at_input_size() -> None:
    """Every student: normalised (B, 3, H, W) → (B, C, H, W); the backbone and head
    parameter groups split the network (the backbone trains at lr × 0.1)."""
    x = torch.rand(2, 3, 32, 32)
    tiny_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    cases = {
        "tiny": {},
        "vit": {"arch": "vit_tiny_patch16_224", "model_kwargs": tiny_vit, "hidden": 16},
    }
    for name, options in cases.items():
        student = create_student(name, 5, options)
        assert student(student.normalize(x)).shape == (2, 5, 32, 32)
        owned = {id(p) for p in student.backbone.parameters()} | {
            id(p) for p in student.head.parameters()
        }
        assert owned == {id(p) for p in student.parameters()}
        assert student.predict(x[0]).shape == (32, 32)
        again = create_student(name, 5, options)  # seeded: the same every time
        assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))


@pytest.mark.slow
def test_deeplab_student_is_torchvisions_deeplabv3_resnet101() -> None:
    student = create_student("deeplabv3_resnet101", 27)
    assert student.head[-1].out_channels == 27
    assert sum(p.numel() for p in student.backbone.parameters()) == 42_500_160  # ResNet-101, no fc
    with torch.no_grad():
        assert student.eval()(torch.rand(1, 3, 33, 41)).shape == (1, 27, 33, 41)
    with pytest.raises(InputError, match="does not exist"):
        create_student("deeplabv3_resnet101", 27, {"weights_backbone": "/no/such.pth"})


def _tiny(**changes) -> PlusConfig:
    base = PRESETS["tiny"].to_dict()
    base.update(changes)
    return PlusConfig(**base)


def test_training_resumes_bit_for_bit(tmp_path: Path) -> None:
    """4 steps at once == 2 steps, stop, resume for 2 more (data order, augmentation,
    optimizer state and the poly schedule all continue)."""
    ds = create_dataset(TOY.format(n=6, seed=0))
    labelled = pseudo_label(ds, lambda im: torch.ones(im.shape[-2:], dtype=torch.int64), tmp_path)
    train, held = split_heldout(labelled, 0.3)
    kwargs = {"augment": {"crop": 32}, "batch_size": 2, "eval_every": 0, "save_every": 2}
    whole = PlusTrainer(_tiny(iterations=4, **kwargs), train, held, tmp_path / "a", False)
    whole.fit()
    first = PlusTrainer(_tiny(iterations=4, **kwargs), train, held, tmp_path / "b", False)
    first.batches = _stop_after(first.batches, 2)
    first.fit()
    assert first.step == 2
    with pytest.raises(InputError, match="--resume"):
        PlusTrainer(_tiny(iterations=4, **kwargs), train, held, tmp_path / "b", False).fit()
    rest = PlusTrainer(_tiny(iterations=4, resume=True, **kwargs), train, held, tmp_path / "b")
    rest.progress = False
    rest.fit()
    assert rest.step == 4
    a, b = whole.student.state_dict(), rest.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _stop_after(batches, count):
    def limited():
        for i, batch in enumerate(batches()):
            if i == count:
                return
            yield batch

    return limited


def test_checkpoints_are_selected_on_pseudo_labels(tmp_path: Path) -> None:
    """A teacher that calls everything class 1: the held-out score the run selects on is
    agreement with that teacher (high), not with the ground truth (low)."""
    ds = create_dataset(TOY.format(n=6, seed=0))
    ones = lambda im: torch.ones(im.shape[-2:], dtype=torch.int64)  # noqa: E731
    config = _tiny(iterations=20, batch_size=4, augment={"crop": 32})
    trainer, summary = train_plus(ds, ones, tmp_path, config, progress=False)
    assert summary["best_miou"] > 0.95
    assert trainer.evaluate(ds) < 0.3  # against the ground truth
    student = load_student(tmp_path / "student.safetensors")
    assert bool((student.predict(ds[0].image) == 1).all())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("heldout_pseudo_miou", -1) for r in lines) == summary["best_miou"]


# --------------------------------------------------------------------------- toy world


class NoisyOracle:
    """A stand-in teacher: the ground truth with a seeded fifth of 6x6 blocks relabelled
    at random, plus a one-pixel band of errors along class boundaries (like a coarse,
    patch-level teacher)."""

    def __init__(self, dataset: DenseDataset, seed: int = 0) -> None:
        self.truth = {float(s.image.sum()): s.label for s in dataset}
        self.seed = seed

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        label = self.truth[float(image.sum())].clone()
        rng = np.random.default_rng([self.seed, int(label.sum())])
        h, w = label.shape
        for y in range(0, h, 6):
            for x in range(0, w, 6):
                if rng.random() < 0.2:
                    label[y : y + 6, x : x + 6] = int(rng.integers(0, 4))
        edge = torch.zeros_like(label, dtype=torch.bool)
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        label[edge] = torch.roll(label, 1, dims=1)[edge]
        return label


def _miou(predict, dataset: DenseDataset) -> float:
    matrix = ConfusionMatrix(4, 255)
    for sample in dataset:
        matrix.update(predict(sample.image), sample.label)
    return matrix.compute().miou


@pytest.mark.slow
def test_student_matches_its_teacher_on_held_out_scenes(tmp_path: Path) -> None:
    """Acceptance (issue 11, ReCo+): trained on a teacher's pseudo-labels of train scenes,
    the student reaches at least the teacher's mIoU − 0.02 on held-out scenes."""
    train = create_dataset(TOY.format(n=48, seed=0))
    test = create_dataset(TOY.format(n=24, seed=1))
    teacher = NoisyOracle(_join(train, test))
    teacher_miou = _miou(teacher, test)
    trainer, summary = train_plus(train, teacher, tmp_path, PRESETS["tiny"], progress=False)
    student = load_student(tmp_path / "student.safetensors")
    student_miou = _miou(student.predict, test)
    print(f"teacher {teacher_miou:.3f} student {student_miou:.3f} (best step {summary})")
    assert 0.4 < teacher_miou < 0.9  # a teacher that is neither useless nor perfect
    assert student_miou >= teacher_miou - 0.02


def _join(*datasets: DenseDataset) -> list[Sample]:
    return [s for ds in datasets for s in ds]


@pytest.mark.slow
def test_student_of_reco_matches_it_on_held_out_toy_scenes(tmp_path: Path) -> None:
    """Acceptance (issue 11, ReCo+) with ReCo itself as the teacher, in the ReCo toy world
    (:mod:`hbird.zeroshot.toy`: the toy CLIP and encoder of ReCo's end-to-end test):
    the student reaches at least ReCo's mIoU − 0.02 on held-out scenes."""
    from hbird.data.synthetic import write_scene_folder
    from hbird.zeroshot import toy
    from hbird.zeroshot.collection import ImageCollection
    from hbird.zeroshot.reco import ReCo

    clip = toy.ToyClip()
    collection = write_scene_folder(
        tmp_path / "collection", toy.make_scenes(80, seed=0), toy.CLASSES, with_depth=False
    )
    coll = ImageCollection.build(collection / "images", clip, tmp_path / "coll", progress=False)
    reco = ReCo(
        collection=coll,
        encoder=toy.ToyEncoder(),
        dense_clip=clip,
        progress=False,
        k=24,
        image_size=48,
        contexts=("gray",),
    ).build(list(toy.CLASSES))

    def scenes(seed: int, n: int) -> list:
        return [
            toy.make_scene(seed, i, objects=[1 + i % 4, 1 + (i + 1) % 4], sizes=(8, 18))
            for i in range(n)
        ]

    train_root = write_scene_folder(tmp_path / "train", scenes(2, 40), toy.CLASSES, False)
    train = create_dataset(f"folder:root={train_root}")
    held_out = scenes(3, 16)

    def miou(predict) -> float:
        matrix = ConfusionMatrix(len(toy.CLASSES), 255)
        for scene in held_out:
            matrix.update(predict(scene.image), scene.mask)
        return matrix.compute().miou

    teacher_miou = miou(lambda image: reco.predict([image])[0])
    config = _tiny(iterations=300, augment={"crop": 48})
    train_plus(
        train, lambda image: reco.predict([image])[0], tmp_path / "run", config, progress=False
    )
    student_miou = miou(load_student(tmp_path / "run" / "student.safetensors").predict)
    print(f"ReCo {teacher_miou:.3f} student {student_miou:.3f}")
    assert teacher_miou > 0.5
    assert student_miou >= teacher_miou - 0.02


@pytest.mark.slow
def test_cli_plus_end_to_end(tmp_path: Path, capsys) -> None:
    """``hbird zeroshot index → build → plus`` on a written toy-world folder; refs built
    for other classes than the dataset's are refused with one line."""
    from hbird.cli import main
    from hbird.data.synthetic import write_scene_folder
    from hbird.zeroshot import toy

    write_scene_folder(tmp_path / "unlabelled", toy.make_scenes(30, seed=0), toy.CLASSES, False)
    scenes = [toy.make_scene(2, i, objects=[1 + i % 4], sizes=(12, 20)) for i in range(8)]
    write_scene_folder(tmp_path / "bench" / "train", scenes, toy.CLASSES, False)
    coll, refs, run = tmp_path / "coll", tmp_path / "refs", tmp_path / "run"
    images = tmp_path / "unlabelled" / "images"
    assert (
        main(f"zeroshot index --images {images} --clip toy_clip --out {coll} --quiet".split()) == 0
    )
    build = f"zeroshot build --collection {coll} --encoder test_vit --dense-clip toy_clip --k 8"
    build += " --image-size 48 --contexts gray --quiet --classes"
    assert main([*build.split(), ",".join(toy.CLASSES), "--out", str(refs)]) == 0
    dataset = f"folder:root={tmp_path / 'bench'}:split=train"
    plus = f"zeroshot plus --refs {refs} --dataset {dataset} --preset tiny --iterations 6"
    plus += f" --batch-size 2 --crop 32 --eval-every 3 --quiet --score-on {dataset}"
    assert main([*plus.split(), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["best_step"] in (3, 6)
    assert 0.0 <= summary["score_on"]["miou"] <= 1.0
    assert len(list((run / "pseudo_labels").glob("*.png"))) == 8
    assert (run / "student.safetensors").is_file()
    assert main([*plus.split(), "--out", str(run)]) == 2  # a finished run needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*plus.split(), "--out", str(run), "--resume"]) == 0  # nothing left to do
    other = tmp_path / "refs_other"
    assert main([*build.split(), "gray,red", "--out", str(other)]) == 0
    assert main([*plus.split(), "--refs", str(other), "--out", str(tmp_path / "run2")]) == 2
    assert "were built for the classes" in capsys.readouterr().err
