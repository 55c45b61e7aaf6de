"""What FUNGI needs from a frozen model: an embedding per input and a named linear layer.

:class:`ImageBackbone` wraps an :class:`hbird.encoders.Encoder` (timm, Hugging Face or
any other backend); :class:`TextBackbone` wraps a Hugging Face text model and its
tokenizer; :class:`hbird.fungi.audio.AudioBackbone` an Audio Spectrogram Transformer. Both map a group of views to pooled embeddings ``(N, D)``; gradient layers are
named by their module path under :attr:`FungiBackbone.root` (``"blocks.11.attn.proj"``).
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hbird.encoders.base import Encoder
from hbird.errors import InputError, spell
from hbird.fungi.class_token import class_token_embedding, class_token_tail_applies
from hbird.fungi.views import Views, canvas_side, center_square, snap_to_patch, square_images


class FungiBackbone(abc.ABC):
    """A frozen model seen by FUNGI.

    Attributes:
        modality: ``"image"``, ``"text"`` or ``"audio"`` (losses pick their views by it).
        name: the model's name, for reports and saved extractors.
        embed_dim: width ``D`` of :meth:`embed`'s output.
        root: the module gradient layers are named under.
        default_layer: path of the default gradient layer under ``root`` (the last
            block's attention output projection).
    """

    modality: ClassVar[str]
    name: str
    embed_dim: int
    root: nn.Module
    default_layer: str

    @abc.abstractmethod
    def prepare(self, inputs: Sequence[Any]) -> Views:
        """``B`` raw inputs → the batch every loss makes its views from."""

    @abc.abstractmethod
    def embed(self, views: Views) -> torch.Tensor:
        """``N`` views → pooled embeddings ``(N, D)`` (not normalised)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, str]:
        """Name and hashes of the architecture and weights (checked when loading)."""

    def input_view(self, batch: Views) -> Views:
        """The inputs themselves in a prepared batch (what is embedded; default: all of it)."""
        return batch

    def batch_slice(self, batch: Views, start: int, stop: int) -> Views:
        """Samples ``start:stop`` of a prepared batch."""
        return batch[start:stop]

    @property
    def device(self) -> torch.device:
        param = next(self.root.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.root.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def resolve_layer(self, path: str | None) -> tuple[str, nn.Linear]:
        """``(path, module)`` of the gradient layer; ``None`` picks :attr:`default_layer`."""
        path = self.default_layer if path is None else path
        if not path:
            if not any(isinstance(m, nn.Linear) for m in self.root.modules()):
                raise InputError(
                    f"{self.name} has no nn.Linear layer, so FUNGI has no gradient to take "
                    "(all-convolution models such as ELASTIC); use a ViT or Axial-ResNet encoder"
                )
            raise InputError(
                f"{self.name}: no default gradient layer is known for this model; pass "
                "layer='<module path>' naming an nn.Linear (see model.named_modules())"
            )
        try:
            module = self.root.get_submodule(path)
        except AttributeError:
            linears = [n for n, m in self.root.named_modules() if isinstance(m, nn.Linear)]
            raise InputError(
                f"{spell('layer', path)}: {self.name} has no module of that name; its linear layers "
                f"are e.g. {', '.join(linears[-4:])}"
            ) from None
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"gradient layer {path!r} of {self.name} is a {type(module).__name__}; "
                "FUNGI takes the gradients of an nn.Linear (e.g. the attention output projection)"
            )
        return path, module


# -- images -------------------------------------------------------------------------------


def _timm_default_layer(model: nn.Module) -> str:
    return f"blocks.{len(model.blocks) - 1}.attn.proj"


HF_BLOCK_LISTS = ("encoder.layer", "encoder.layers", "vision_model.encoder.layers", "layers")
HF_ATTENTION_OUTPUTS = (
    "attention.output.dense",  # BERT, ViT
    "attention.o_proj",  # DINOv2 (transformers 5)
    "self_attn.out_proj",  # CLIP
    "self_attn.o_proj",
    "attention.out_proj",
)


def _hf_default_layer(model: nn.Module) -> str:
    """The last block's attention output projection of a ``transformers`` encoder, or ``""``."""
    for blocks_path in HF_BLOCK_LISTS:
        try:
            blocks = model.get_submodule(blocks_path)
        except AttributeError:
            continue
        for suffix in HF_ATTENTION_OUTPUTS:
            path = f"{blocks_path}.{len(blocks) - 1}.{suffix}"
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            return path
    return ""


class ImageBackbone(FungiBackbone):
    """An :class:`~hbird.encoders.Encoder` as a FUNGI backbone.

    The embedding is the model's own image embedding: the pooled output of timm models
    (CLS token or average, as the model is configured, after the final norm), the
    final-normed CLS token of Hugging Face models, and the mean patch feature for any
    other encoder.

    Args:
        encoder: a frozen encoder (``hbird.encoders.create_encoder``).
        image_size: side ``S`` of the square input the embedding sees (snapped to a
            multiple of the patch size); the paper uses 224.
        resize: how :meth:`prepare` makes the canvas the views are cut from
            (:func:`~hbird.fungi.views.square_images`): ``"square"`` (FUNGI's code: resize
            to ``256/224 · S`` square, the input is its central ``S × S``) or
            ``"short-side"`` (short side to ``S``, centre crop).

    Attributes:
        class_token_tail: run the last block of a class-token timm ViT for the class
            token alone (:mod:`hbird.fungi.class_token`; the same embedding and gradients
            up to float rounding, ~6% less work). ``False`` runs the whole last block.
    """

    modality = "image"
    class_token_tail = True

    def __init__(self, encoder: Encoder, image_size: int = 224, resize: str = "square") -> None:
        self.encoder = encoder
        self.name = encoder.name
        self.patch_size = encoder.patch_size
        self.embed_dim = encoder.embed_dim
        self.image_size = snap_to_patch(image_size, encoder.patch_size)
        self.resize = resize
        self.canvas_size = canvas_side(self.image_size, resize)
        model = getattr(encoder, "model", None)
        self.root = model if isinstance(model, nn.Module) else encoder
        if hasattr(self.root, "forward_head") and hasattr(self.root, "blocks"):
            self._kind = "timm"
            self.default_layer = _timm_default_layer(self.root)
        elif hasattr(encoder, "final_norm") and hasattr(self.root, "config"):
            self._kind = "hf"
            self.default_layer = _hf_default_layer(self.root)
            accepts = inspect.signature(self.root.forward).parameters
            self._hf_options = (
                {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
            )
        else:  # a feature-map backbone may name its gradient layer (encoders/conv_backbone)
            self._kind = "patches"
            self.default_layer = getattr(encoder, "gradient_layer", "")

    def prepare(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images ``(3, H, W)`` in [0, 1] → canvases ``(B, 3, C, C)``, ``C = canvas_size``."""
        return square_images(inputs, self.image_size, self.resize)

    def input_view(self, batch: torch.Tensor) -> torch.Tensor:
        """Canvases ``(B, 3, C, C)`` → the inputs ``(B, 3, S, S)``: their central square."""
        return center_square(batch, self.image_size)

    def _normalised(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(device=self.device, dtype=torch.float32)
        return self.encoder.normalize(x).to(self.dtype)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h, w)`` in [0, 1] (sides multiples of the patch) → ``(N, D)``."""
        x = self._normalised(views)
        if self._kind == "timm":
            if self.class_token_tail and class_token_tail_applies(self.root):
                return class_token_embedding(self.root, x)
            return self.root.forward_head(self.root.forward_features(x), pre_logits=True)
        if self._kind == "hf":
            out = self.root(pixel_values=x, output_hidden_states=True, **self._hf_options)
            return self.encoder.final_norm(out.hidden_states[-1][:, 0])
        return self.encoder.forward_patches(x).mean(dim=(1, 2))

    def patch_features(self, views: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h·p, w·p)`` in [0, 1] → last-block patch features ``(N, h, w, D)``."""
        return self.encoder.forward_patches(self._normalised(views))

    def identity(self) -> dict[str, str]:
        return self.encoder.identity()


# -- texts --------------------------------------------------------------------------------


class TextBackbone(FungiBackbone):
    """A Hugging Face text encoder (BERT-like) and its tokenizer as a FUNGI backbone.

    Args:
        model: a ``transformers`` model returning ``last_hidden_state`` (e.g. ``BertModel``);
            it is frozen (``eval``, ``requires_grad=False``) in place.
        tokenizer: a callable tokenizer (``AutoTokenizer``) answering ``input_ids`` and
            ``attention_mask`` for a list of strings.
        pooling: ``"mean"`` over non-padding tokens, or ``"cls"`` (the first token).
        max_length: longest token sequence kept (longer texts are truncated).
        name: how the model is named in reports (default: its config's ``_name_or_path``
            or class name).
    """

    modality = "text"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        max_length: int = 512,
        name: str | None = None,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        model.requires_grad_(False)
        self.root = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        config = getattr(model, "config", None)
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise ValueError(
                f"{self.name}: the model config has no hidden_size; TextBackbone needs a "
                "transformers encoder such as BertModel"
            )
        self.embed_dim = int(hidden)
        self.default_layer = _hf_default_layer(model)

    def prepare(self, inputs: Sequence[str]) -> list[str]:
        texts = list(inputs)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"text inputs must be strings; items {bad[:5]} are not")
        return texts

    def embed(self, views: list[str]) -> torch.Tensor:
        """``N`` strings → ``(N, D)``: mean of non-padding tokens, or the first token."""
        tokens = self.tokenizer(
            list(views),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        hidden = self.root(**tokens).last_hidden_state  # (N, T, D)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # (N, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def identity(self) -> dict[str, str]:
        return module_identity(self.root, self.name)


def module_identity(model: nn.Module, name: str) -> dict[str, str]:
    """``name``, a hash of the parameter shapes and one of (a sample of) the weights."""
    state = model.state_dict()
    shapes = {k: list(v.shape) for k, v in state.items()}
    config_hash = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64).cpu().numpy()
        digest.update(key.encode())
        digest.update(sample.tobytes())
    return {
        "name": name,
        "config_hash": config_hash[:16],
        "weights_hash": digest.hexdigest()[:16],
    }


def as_backbone(
    model: Encoder | FungiBackbone, image_size: int = 224, resize: str = "square"
) -> FungiBackbone:
    """An encoder wrapped as an :class:`ImageBackbone`; a backbone is returned as is."""
    if isinstance(model, FungiBackbone):
        return model
    if isinstance(model, Encoder):
        return ImageBackbone(model, image_size=image_size, resize=resize)
    raise TypeError(
        f"FUNGI needs an hbird Encoder (hbird.encoders.create_encoder) or a FungiBackbone "
        f"(e.g. TextBackbone(model, tokenizer), hbird.fungi.audio.AudioBackbone), got "
        f"{type(model).__name__}"
    )
