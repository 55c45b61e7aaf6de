"""Child process of ``open_hbird_peer.py`` and ``compare_peer.py``: open-hummingbird-eval
on the files they wrote.

Run with the peer's folder first on ``sys.path`` (its package is also named ``hbird``, so
our package is never imported here). Its own transforms, memory and cross-attention are
used; two things are supplied: the feature function (the ViT's last-block patch tokens,
normed, through the peer's ``FeatureExtractorSimple``) and, unless ``setup["nn"]`` is
``"scann"`` (its default backend), a CPU exact search in place of its faiss-GPU index:
``"torch"`` (matmul + top-k) or ``"faiss"`` (faiss ``IndexFlatIP``). Its augmentation is
switched off (val transforms for the memory pass) because the two augmentations differ
by design (docs/evaluation.md). Images are read lazily, one batch at a time.

``setup.json`` fields: ``prompt`` / ``query`` (lists of ``[image, mask]`` paths relative to
the work folder), ``image_size``, ``num_classes``, ``k``, ``model`` (timm
``VisionTransformer`` kwargs) or ``timm_model`` (a timm name), and optionally ``nn``,
``threads``, ``batch_size``, ``details`` (save the query soft labels,
``peer_soft_labels.pt``) and ``result`` (a JSON file for build / eval / search seconds,
Hungarian-matched mIoU and RSS samples).

    python _open_hbird_peer.py WORK_DIR PEER_DIR
"""

import json
import resource
import sys
import time
import types
from pathlib import Path

work, peer = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, peer)
sys.modules["pytorch_lightning"] = types.SimpleNamespace(LightningDataModule=object)

import timm  # noqa: E402
import torch  # noqa: E402
from hbird.hbird_eval import HbirdEvaluation  # noqa: E402  (the peer's)
from hbird.models import FeatureExtractorSimple  # noqa: E402
from hbird.utils.image_transformations import CombTransforms  # noqa: E402
from hbird.utils.transforms import get_hbird_val_transforms  # noqa: E402
from PIL import Image  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

setup = json.loads((work / "setup.json").read_text())
if setup.get("threads"):
    torch.set_num_threads(setup["threads"])
if "timm_model" in setup:
    model = timm.create_model(setup["timm_model"], num_classes=0, dynamic_img_size=True)
else:
    model = VisionTransformer(**setup["model"])
model.load_state_dict(torch.load(work / "model.pt"))
model.eval()
nn = setup.get("nn", "torch")
searching = [0.0]  # seconds spent in the search backend


def patch_tokens(m, images):
    return m.forward_features(images)[:, m.num_prefix_tokens :], None


class Exact:
    """Exact inner-product top-k (the peer's search protocol: ``find_nearest_neighbors``)."""

    def __init__(self, memory: torch.Tensor, k: int) -> None:
        self.memory, self.k = memory, k
        if nn == "faiss":
            import faiss

            if setup.get("threads"):
                faiss.omp_set_num_threads(setup["threads"])
            self.index = faiss.IndexFlatIP(memory.shape[1])
            self.index.add(memory.numpy())

    def find_nearest_neighbors(self, q):
        if nn == "faiss":
            sims, ids = self.index.search(q.numpy(), self.k)
            return ids, sims
        sims, ids = (q @ self.memory.T).topk(self.k, dim=1)
        return ids.numpy(), sims.numpy()


def timed(search):
    def find_nearest_neighbors(q):
        start = time.perf_counter()
        out = search(q)
        searching[0] += time.perf_counter() - start
        return out

    return find_nearest_neighbors


create_nn = HbirdEvaluation._create_nn


def use_backend(self, n_neighbours=30, nn_method="faiss", **kwargs):
    if nn == "scann":
        create_nn(self, n_neighbours, nn_method="scann", **kwargs)
    else:
        self.NN_algorithm = Exact(self.feature_memory, n_neighbours)
    self.NN_algorithm.find_nearest_neighbors = timed(self.NN_algorithm.find_nearest_neighbors)


HbirdEvaluation._create_nn = use_backend
size = setup["image_size"]
val = get_hbird_val_transforms(size)
transform = CombTransforms(img_transform=val["img"], img_tgt_transform=val["shared"])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """``VmHWM``: this process's own peak (``ru_maxrss`` would include the parent's size)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Pairs(torch.utils.data.Dataset):
    """(image, mask) pairs of one split, read and transformed when asked for."""

    def __init__(self, split: str) -> None:
        self.files = setup[split]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image, mask = self.files[i]
        return transform(Image.open(work / image).convert("RGB"), Image.open(work / mask))


class Sampled:
    """A loader that records the RSS after each batch has been used (queries done → bytes)."""

    def __init__(self, loader) -> None:
        self.loader, self.samples, self.done = loader, {}, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x, y
            self.done += len(x)
            self.samples[self.done] = rss()


def loader(split):
    batch = setup.get("batch_size", 8)
    return torch.utils.data.DataLoader(Pairs(split), batch_size=batch, shuffle=False)


grid = size // model.patch_embed.patch_size[0]
extractor = FeatureExtractorSimple(model, patch_tokens, grid, model.embed_dim)
rss_before_build = rss()
start = time.perf_counter()
evaluator = HbirdEvaluation(extractor, loader("prompt"), num_classes=setup["num_classes"],
                            n_neighbours=setup["k"], augmentation_epoch=1, nn_method="faiss")  # fmt: skip
build = time.perf_counter() - start
rss_after_build = rss()
peak_after_build = peak_rss()
queries = Sampled(loader("query"))
start = time.perf_counter()
if setup.get("details", True):
    miou, details = evaluator.evaluate(queries, grid, return_knn_details=True)
    torch.save(details["knns_ca_labels"], work / "peer_soft_labels.pt")  # (Q, grid², C)
else:
    miou = evaluator.evaluate(queries, grid)
seconds = time.perf_counter() - start
if setup.get("result"):
    result = {
        "build_seconds": build,
        "eval_seconds": seconds,
        "search_seconds": searching[0],
        "miou_hungarian": float(miou),
        "memory_entries": int(evaluator.feature_memory.shape[0]),
        "bank_bytes": sum(
            m.numel() * m.element_size() for m in (evaluator.feature_memory, evaluator.label_memory)
        ),
        "queries": queries.done,
        "rss_bytes_before_build": rss_before_build,
        "rss_bytes_after_build": rss_after_build,
        "peak_rss_bytes_after_build": peak_after_build,
        "rss_bytes_after_queries": queries.samples,
        "rss_bytes_at_end": rss(),
        "peak_rss_bytes": peak_rss(),
    }
    (work / setup["result"]).write_text(json.dumps(result))
