import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data.synthetic import (
    CLASS_NAMES,
    SyntheticScene,
    class_depth,
    class_style,
    default_class_names,
    make_scene,
    make_scenes,
    write_scene_folder,
)
from hbird.io.images import load_depth, load_image, load_mask

PATCH = 8


def scenes_equal(a: SyntheticScene, b: SyntheticScene) -> bool:
    return (
        torch.equal(a.image, b.image)
        and torch.equal(a.mask, b.mask)
        and torch.equal(a.depth, b.depth)
        and a.num_classes == b.num_classes
    )


def patch_fractions(mask: torch.Tensor, class_id: int) -> torch.Tensor:
    """(h, w) fraction of each 8x8 patch labelled ``class_id``."""
    h, w = mask.shape[0] // PATCH, mask.shape[1] // PATCH
    hit = (mask[: h * PATCH, : w * PATCH] == class_id).float()
    return hit.reshape(h, PATCH, w, PATCH).mean(dim=(1, 3))


def pure_patch_colours(scenes: list[SyntheticScene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean RGB (N, 3) and class (N,) of every 8x8 patch that lies inside one class."""
    feats, labels = [], []
    for s in scenes:
        h, w = s.mask.shape[0] // PATCH, s.mask.shape[1] // PATCH
        colours = s.image.reshape(3, h, PATCH, w, PATCH).mean(dim=(2, 4)).permute(1, 2, 0)
        blocks = s.mask.reshape(h, PATCH, w, PATCH).permute(0, 2, 1, 3).reshape(h, w, -1)
        pure = (blocks == blocks[..., :1]).all(-1)
        feats.append(colours[pure])
        labels.append(blocks[..., 0][pure])
    return torch.cat(feats), torch.cat(labels)


def test_scene_types_shapes_and_ranges():
    s = make_scene(0, size=(64, 80), num_classes=5)
    assert s.image.shape == (3, 64, 80) and s.image.dtype == torch.float32
    assert s.mask.shape == (64, 80) and s.mask.dtype == torch.int64
    assert s.depth.shape == (64, 80) and s.depth.dtype == torch.float32
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0
    assert torch.equal(torch.round(s.image * 255) / 255, s.image)  # 8-bit exact
    assert s.mask.min() >= 0 and s.mask.max() < 5
    assert (s.depth > 0).all() and s.depth.max() < 10.0
    assert s.num_classes == 5


def test_deterministic_for_a_seed_and_prefix_stable():
    a, b = make_scenes(4, seed=7), make_scenes(4, seed=7)
    assert all(scenes_equal(x, y) for x, y in zip(a, b))
    assert all(scenes_equal(x, y) for x, y in zip(make_scenes(2, seed=7), a))  # independent of n
    other = make_scenes(4, seed=8)
    assert not any(torch.equal(x.image, y.image) for x, y in zip(a, other))
    assert not torch.equal(a[0].image, a[1].image)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert scenes_equal(make_scene(g1), make_scene(g2))
    assert scenes_equal(make_scene(3), make_scene(np.random.default_rng(3)))


def test_global_rngs_untouched():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002
    make_scenes(3, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


@pytest.mark.parametrize("num_classes", [2, 4, 9])
def test_every_class_appears_in_a_small_set(num_classes):
    scenes = make_scenes(num_classes - 1, seed=0, num_classes=num_classes)
    present = set(torch.cat([s.mask.unique() for s in scenes]).tolist())
    assert present == set(range(num_classes))


def test_shapes_cover_whole_patches():
    scenes = make_scenes(24, seed=0, num_classes=6)
    for s in scenes:
        for c in s.mask.unique().tolist():
            if c == 0:
                continue
            frac = patch_fractions(s.mask, c)
            assert (frac >= 0.5).sum() >= 3, f"class {c} covers too few patches"
            assert (frac == 1.0).sum() >= 1, f"class {c} fills no patch"


def test_depth_follows_class_and_ground_plane():
    num_classes = 5
    scenes = make_scenes(24, seed=2, num_classes=num_classes)
    for s in scenes:
        background = s.mask == 0
        col_top = s.depth[0][background[0]]
        col_bottom = s.depth[-1][background[-1]]
        if len(col_top) and len(col_bottom):
            assert col_top.mean() > col_bottom.mean() + 2.0  # far at the top, near below
        if background.any():
            assert s.depth[background].min() > 3.0
    means = []
    for c in range(1, num_classes):
        d = torch.cat([s.depth[s.mask == c] for s in scenes])
        assert abs(d.mean().item() - class_depth(c, num_classes)) < 0.2
        assert d.min() > 0.5 and d.max() < 3.6
        means.append(d.mean().item())
    assert means == sorted(means)


def test_classes_separable_by_patch_colour():
    """Nearest class mean on 8x8 patch mean colours, fitted on one seed, tested on another."""
    for num_classes in (4, 8):
        x_train, y_train = pure_patch_colours(make_scenes(16, seed=0, num_classes=num_classes))
        x_test, y_test = pure_patch_colours(make_scenes(16, seed=1, num_classes=num_classes))
        centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(num_classes)])
        pred = torch.cdist(x_test, centroids).argmin(1)
        per_class = [(pred[y_test == c] == c).float().mean().item() for c in range(num_classes)]
        assert min(per_class) > 0.9, per_class


def _patch_targets(scenes, num_classes):
    """Per 8x8 patch: majority class (N,) and mean depth (N,)."""
    classes, depths = [], []
    for s in scenes:
        h, w = s.mask.shape[0] // PATCH, s.mask.shape[1] // PATCH
        hist = torch.nn.functional.one_hot(s.mask, num_classes).float()
        classes.append(
            hist.reshape(h, PATCH, w, PATCH, -1).mean((1, 3)).reshape(h * w, -1).argmax(1)
        )
        depths.append(s.depth.reshape(h, PATCH, w, PATCH).mean((1, 3)).reshape(-1))
    return torch.cat(classes), torch.cat(depths)


def test_tiny_random_vit_retrieval_works_on_scenes():
    """The point of the scenes: retrieval with an untrained patch-8 ViT beats chance by far."""
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=(96, 128),
            num_classes=0,
        ).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(scenes):
        x = (torch.stack([s.image for s in scenes]) - mean) / std
        with torch.no_grad():
            tokens = vit.forward_features(x)[:, 1:]  # (B, h*w, 32), CLS dropped
        return torch.nn.functional.normalize(tokens, dim=-1).reshape(-1, tokens.shape[-1])

    num_classes = 4
    prompt, query = (
        make_scenes(12, seed=0, num_classes=num_classes),
        make_scenes(8, seed=1, num_classes=num_classes),
    )
    keys, (key_cls, key_depth) = features(prompt), _patch_targets(prompt, num_classes)
    queries, (true_cls, true_depth) = features(query), _patch_targets(query, num_classes)
    sims, ids = (queries @ keys.T).topk(10, dim=1)  # (N, k)
    weights = torch.softmax(sims / 0.1, dim=1)
    votes = torch.zeros(len(queries), num_classes).scatter_add_(1, key_cls[ids], weights)
    accuracy = (votes.argmax(1) == true_cls).float().mean().item()
    majority = (true_cls == 0).float().mean().item()
    assert accuracy > 0.9 and accuracy > majority + 0.15, (accuracy, majority)
    rmse = ((weights * key_depth[ids]).sum(1) - true_depth).pow(2).mean().sqrt()
    baseline = (key_depth.mean() - true_depth).pow(2).mean().sqrt()
    assert rmse < 0.6 * baseline, (rmse, baseline)


def test_class_styles_are_distinct():
    styles = [class_style(c) for c in range(1, 9)]
    colours = np.array([s.colour for s in styles])
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(8) * 9
    assert gaps.min() > 0.15
    assert len({(s.texture, round(s.angle, 3), s.period) for s in styles}) == 8
    with pytest.raises(ValueError, match="background"):
        class_style(0)


def test_default_class_names():
    assert default_class_names(4) == CLASS_NAMES[:4] == ("background", "disc", "box", "triangle")
    names = default_class_names(10)
    assert len(set(names)) == 10 and names[8] == "disc_2"
    with pytest.raises(ValueError, match="num_classes"):
        make_scene(0, num_classes=1)


def test_ignore_boundary_matches_brute_force():
    plain = make_scene(11, size=(40, 48), num_classes=4, num_objects=(3, 3), object_size=(16, 30))
    ignored = make_scene(
        11,
        size=(40, 48),
        num_classes=4,
        num_objects=(3, 3),
        object_size=(16, 30),
        ignore_boundary=2,
    )
    assert torch.equal(plain.image, ignored.image)
    m = plain.mask.numpy()
    expected = m.copy()
    for y in range(m.shape[0]):
        for x in range(m.shape[1]):
            window = m[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            if (window != m[y, x]).any():
                expected[y, x] = 255
    assert np.array_equal(ignored.mask.numpy(), expected)
    assert (expected == 255).any()


def test_folder_round_trip_is_exact(tmp_path):
    scenes = make_scenes(3, seed=4, num_classes=5, ignore_boundary=1)
    root = write_scene_folder(tmp_path / "prompt", scenes)
    assert root == tmp_path / "prompt"
    assert (root / "classes.txt").read_text().splitlines() == list(CLASS_NAMES[:5])
    for i, s in enumerate(scenes):
        stem = f"scene_{i:04d}"
        assert torch.equal(load_image(root / "images" / f"{stem}.png"), s.image)
        assert torch.equal(load_mask(root / "masks" / f"{stem}.png"), s.mask)
        depth = load_depth(root / "depth" / f"{stem}.png")
        assert torch.equal(depth, s.depth)
        assert Image.open(root / "masks" / f"{stem}.png").mode == "P"
        assert Image.open(root / "depth" / f"{stem}.png").mode.startswith("I;16")
    assert sorted(p.name for p in (root / "images").iterdir()) == [
        f"scene_{i:04d}.png" for i in range(3)
    ]


def test_folder_options_and_validation(tmp_path):
    scenes = make_scenes(2, seed=0, num_classes=3)
    root = write_scene_folder(
        tmp_path / "a", scenes, class_names=["bg", "x", "y"], with_depth=False, prefix="q"
    )
    assert not (root / "depth").exists()
    assert (root / "masks" / "q_0001.png").is_file()
    assert (root / "classes.txt").read_text() == "bg\nx\ny\n"
    with pytest.raises(ValueError, match="2 class names"):
        write_scene_folder(tmp_path / "b", scenes, class_names=["bg", "x"])
    assert not (tmp_path / "b").exists()  # nothing half-written
    mixed = [scenes[0], make_scene(0, num_classes=4)]
    with pytest.raises(ValueError, match="different label sets"):
        write_scene_folder(tmp_path / "c", mixed)
