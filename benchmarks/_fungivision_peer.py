"""Child process of ``fungi.py --peer``: fungivision (the FUNGI authors' package) on the
files it wrote, timed. Never imports hbird.

Run with a Python that can import ``fungivision`` (``pip install --no-deps fungivision``
in a venv, or ``--target DIR`` put on this process's ``PYTHONPATH`` only).
fungivision's own ``FUNGIWrapper``, transforms, losses, per-sample gradients
(autograd-hacks) and projection are used, on PIL images. The parent supplies what would
otherwise be drawn from torch's global RNG, so both sides compute the same features:

- the random heads (KL, DINO student and teacher, SimCLR) and the ±1 projection, copied
  into the extractors before use (the projection is set after construction, because
  ``FUNGIWrapper(projection=...)`` fails in fungivision 0.0.2: ``scaling`` is undefined);
- each image's 12 DINO crop boxes, returned by its ``RandomResizedCrop`` s in the order
  fungivision calls them (2 global, then 10 local, image after image);
- the SimCLR negative batch: ``(N, D)`` embeddings, put through the SimCLR head as
  fungivision's ``setup`` does, instead of ``setup`` drawing and encoding images;
- the model's own normalisation: fungivision always normalises with ImageNet's mean and
  std, so the model is wrapped to map that back to the encoder's (one affine per pixel).

The embedding part of a FUNGI feature is not computed by fungivision's wrapper; as the
authors' evaluation does, it is ``model(KL transform(image))`` under ``no_grad``, timed
with the rest.

``setup.json`` fields: ``timm_model``, ``image_size``, ``images`` (PNG paths relative to
the work folder), ``batch_size``, ``threads``, ``losses``, ``head_dims``, ``temperatures``,
``mean`` / ``std`` (the encoder's), ``boxes`` (per image, 12 ``[top, left, height,
width]``), ``layer``; ``model.pt`` (state dict) and ``given.pt`` (heads, ``projection``
int8 ``(d, m)``, ``negatives`` ``(N, D)``). Prints one JSON line: seconds per stage and
in all, images, peak RSS; writes the features (``{part: (N, D)}``) to ``features_out``.

    python _fungivision_peer.py WORK_DIR
"""

import json
import sys
import time
import types
from pathlib import Path

import timm
import torch
from fungivision.config import DINOConfig, KLConfig, SimCLRConfig
from fungivision.gradients.kl_extractor import KLGradientsExtractor
from fungivision.wrapper import FUNGIWrapper
from PIL import Image
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

work = Path(sys.argv[1])
setup = json.loads((work / "setup.json").read_text())
torch.set_num_threads(setup["threads"])
torch.manual_seed(0)


def peak_rss() -> int:
    """``VmHWM``: this process's own peak resident set."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Renormalised(nn.Module):
    """``model`` fed ImageNet-normalised images, renormalised with the encoder's mean/std."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        (m_in, s_in), (m_out, s_out) = IMAGENET, (mean, std)
        scale = torch.tensor(s_in) / torch.tensor(s_out)
        shift = (torch.tensor(m_in) - torch.tensor(m_out)) / torch.tensor(s_out)
        self.register_buffer("scale", scale[:, None, None])
        self.register_buffer("shift", shift[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


model = timm.create_model(setup["timm_model"], num_classes=0)
model.load_state_dict(torch.load(work / "model.pt"))
model = Renormalised(model.eval(), setup["mean"], setup["std"]).eval()
given = torch.load(work / "given.pt")
configs = {
    "kl": KLConfig(temperature=setup["temperatures"]["kl"], latent_dim=setup["head_dims"]["kl"]),
    "dino": DINOConfig(
        teacher_temperature=setup["temperatures"]["dino_teacher"],
        student_temperature=setup["temperatures"]["dino_student"],
        latent_dim=setup["head_dims"]["dino"],
    ),
    "simclr": SimCLRConfig(
        temperature=setup["temperatures"]["simclr"],
        latent_dim=setup["head_dims"]["simclr"],
        comparison_batch_size=setup["negative_inputs"],  # only read by setup(), not called
    ),
}
losses = setup["losses"]
wrapper = FUNGIWrapper(
    model=model,
    target_layer=f"model.{setup['layer']}",
    device=torch.device("cpu"),
    input_dim=setup["image_size"],
    extractor_configs=[configs[name] for name in losses],
)
projection = given["projection"].to(torch.float32).T.contiguous()  # (m, d), as fungivision's
boxes = iter([])


def given_box(self, flat_inputs):
    top, left, height, width = next(boxes)
    return {"top": top, "left": left, "height": height, "width": width}


for name, extractor in zip(losses, wrapper.extractors):
    extractor.projection = projection
    extractor.projection_scaling = 1.0 / projection.shape[0] ** 0.5  # hbird's 1/sqrt(m)
    head = "dino.student" if name == "dino" else name
    with torch.no_grad():
        extractor.projection_head.weight.copy_(given[f"{head}.weight"])
        extractor.projection_head.bias.copy_(given[f"{head}.bias"])
        if name == "dino":
            extractor.teacher_projection.weight.copy_(given["dino.teacher.weight"])
            extractor.teacher_projection.bias.copy_(given["dino.teacher.bias"])
            dino = extractor.transform
            for crop in (dino.first_global_crop, dino.second_global_crop, dino.local_crop):
                crop.transforms[0].make_params = types.MethodType(given_box, crop.transforms[0])
        if name == "simclr":
            extractor.comparison_batch = extractor.projection_head(given["negatives"]).detach()
kl_view = KLGradientsExtractor.input_transform(None, setup["image_size"])  # uses no state


def embed(images) -> torch.Tensor:
    """The embedding part: the model on fungivision's KL view (resize 256, centre crop)."""
    with torch.no_grad():
        return model(torch.stack([kl_view(x) for x in images]))


images = [Image.open(work / p).convert("RGB") for p in setup["images"]]
embed(images[:1])  # warm-up (hbird's child warms up the same way)
all_boxes = setup["boxes"]
batch = setup["batch_size"]
stages = {name: 0.0 for name in [*losses, "embedding"]}
parts = {name: [] for name in stages}
start, cpu_start = time.perf_counter(), time.process_time()
for first in range(0, len(images), batch):
    chunk = images[first : first + batch]
    for name, extractor in zip(losses, wrapper.extractors):
        if name == "dino":
            boxes = iter([b for i in range(first, first + len(chunk)) for b in all_boxes[i]])
        began = time.perf_counter()
        grads = extractor(images=chunk)
        stages[name] += time.perf_counter() - began
        parts[name].append(nn.functional.normalize(grads.detach().float(), dim=-1))
    began = time.perf_counter()
    parts["embedding"].append(nn.functional.normalize(embed(chunk), dim=-1))
    stages["embedding"] += time.perf_counter() - began
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
if setup.get("features_out"):
    torch.save({k: torch.cat(v) for k, v in parts.items()}, work / setup["features_out"])
row = {
    "seconds": seconds,
    "cpu_seconds": cpu_seconds,
    "images": len(images),
    "stage_seconds": stages,
    "peak_rss_bytes": peak_rss(),
}
print(json.dumps(row))
