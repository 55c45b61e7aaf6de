"""Child process of ``open_hbird_peer.py``: open-hummingbird-eval on the files it wrote.

Run by that script with the peer's folder first on ``sys.path`` (its package is also named
``hbird``, so our package is never imported here). Its own transforms, memory and
cross-attention are used; two things are supplied: the feature function (the tiny ViT's
last-block patch tokens, normed, through the peer's ``FeatureExtractorSimple``) and an
exact search in place of its ScaNN/faiss-GPU index, since hbird's side searches exactly.
Its augmentation is switched off (val transforms for the memory pass) because the two
augmentations differ by design (docs/evaluation.md).

    python _open_hbird_peer.py WORK_DIR PEER_DIR
"""

import json
import sys
import types
from pathlib import Path

work, peer = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, peer)
sys.modules["pytorch_lightning"] = types.SimpleNamespace(LightningDataModule=object)

import torch  # noqa: E402
from hbird.hbird_eval import HbirdEvaluation  # noqa: E402  (the peer's)
from hbird.models import FeatureExtractorSimple  # noqa: E402
from hbird.utils.image_transformations import CombTransforms  # noqa: E402
from hbird.utils.transforms import get_hbird_val_transforms  # noqa: E402
from PIL import Image  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

setup = json.loads((work / "setup.json").read_text())
model = VisionTransformer(**setup["model"])
model.load_state_dict(torch.load(work / "model.pt"))
model.eval()


def patch_tokens(m, images):
    return m.forward_features(images)[:, m.num_prefix_tokens :], None


class Exact:
    """Exact inner-product top-k (the peer's search protocol: ``find_nearest_neighbors``)."""

    def __init__(self, memory: torch.Tensor, k: int) -> None:
        self.memory, self.k = memory, k

    def find_nearest_neighbors(self, q):
        sims, ids = (q @ self.memory.T).topk(self.k, dim=1)
        return ids.numpy(), sims.numpy()


def use_exact(self, n_neighbours=30, nn_method="faiss", **kwargs):
    self.NN_algorithm = Exact(self.feature_memory, n_neighbours)


HbirdEvaluation._create_nn = use_exact
size = setup["image_size"]
val = get_hbird_val_transforms(size)
transform = CombTransforms(img_transform=val["img"], img_tgt_transform=val["shared"])


def loader(split):
    pairs = [
        transform(Image.open(work / split / f"{s}.png").convert("RGB"),
                  Image.open(work / split / f"{s}_mask.png"))
        for s in setup[split]
    ]  # fmt: skip
    return torch.utils.data.DataLoader(pairs, batch_size=8, shuffle=False)


grid = size // setup["model"]["patch_size"]
extractor = FeatureExtractorSimple(model, patch_tokens, grid, setup["model"]["embed_dim"])
evaluator = HbirdEvaluation(extractor, loader("prompt"), num_classes=setup["num_classes"],
                            n_neighbours=setup["k"], augmentation_epoch=1, nn_method="faiss")  # fmt: skip
_, details = evaluator.evaluate(loader("query"), grid, return_knn_details=True)
torch.save(details["knns_ca_labels"], work / "peer_soft_labels.pt")  # (Q, grid², C)
