"""Images, class masks and depth maps on disk: read robustly, written atomically.

Reading: images come back as ``(3, H, W)`` float32 tensors in [0, 1] whatever the file
holds (RGBA, palette, grayscale, 16-bit, EXIF-rotated). Labels come back untouched in
value: class masks as ``(H, W)`` int64, depth as ``(H, W)`` float32 metres.

Writing (through :func:`hbird.io.files.atomic_file`): label PNGs are palette (``'P'``)
images whose pixel values *are* the class ids, coloured with the PASCAL VOC map so any
viewer shows colours while :func:`load_mask` reads the ids back unchanged. Depth PNGs
are 16-bit grayscale in millimetres (:data:`DEPTH_PNG_SCALE`), the NYUv2 / KITTI
convention :func:`load_depth` reads.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hbird.errors import InputError
from hbird.io.files import atomic_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

DEPTH_PNG_SCALE = 1000.0
"""Depth PNG units per metre (millimetres)."""


DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""Images with more pixels are refused (PIL's decompression-bomb error limit, ~179 MP)."""
_max_pixels = DEFAULT_MAX_PIXELS


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, images with more than ``max_pixels`` pixels are refused (raise
    it for trusted huge images; lower it to refuse them sooner)."""
    global _max_pixels
    saved = _max_pixels, Image.MAX_IMAGE_PIXELS
    _max_pixels, Image.MAX_IMAGE_PIXELS = max_pixels, None  # PIL's own check: replaced
    try:
        yield
    finally:
        _max_pixels, Image.MAX_IMAGE_PIXELS = saved


def _too_large(path: Path, what: str, size: tuple[int, int] | None, limit: int) -> InputError:
    shape = f" ({size[0]}x{size[1]} = {size[0] * size[1]:,} pixels)" if size else ""
    return InputError(
        f"{what} {path} is larger than the limit of {limit:,} pixels{shape}, a guard "
        "against decompression bombs; if you trust the file, raise the limit with "
        "--max-pixels N (Python: hbird.io.images.pixel_limit(N)) or downscale it"
    )


def _open(path: Path, what: str, verify: bool = False) -> Image.Image:
    """Open ``path`` and decode it (``verify``: check it without decoding, e.g. PNG CRCs)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; check the path (it must be a file)")
    try:
        with warnings.catch_warnings():  # over the limit is an error below, not a warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > _max_pixels:
            raise _too_large(path, what, img.size, _max_pixels)
        img.verify() if verify else img.load()
    except Image.DecompressionBombError:
        raise _too_large(path, what, None, 2 * Image.MAX_IMAGE_PIXELS) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(
            f"{what} {path} could not be read as an image ({err}); "
            "re-save it as PNG or JPEG, or remove it from the folder"
        ) from err
    return img


def pil_to_tensor_rgb(img: Image.Image) -> torch.Tensor:
    """Any PIL image → ``(3, H, W)`` float32 in [0, 1]; EXIF orientation applied."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak, 0, 1).astype(np.float32)
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        top = max(float(arr.max(initial=0)), 1e-12)
        return torch.from_numpy(np.clip(arr / top, 0, 1))[None].expand(3, -1, -1).contiguous()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def file_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """``(H, W)`` of an image, mask or depth file, checked cheaply before any real work.

    Images are opened and verified without being decoded (a truncated or foreign file
    fails here); ``.npy`` arrays have their header read. Raises :class:`InputError`
    naming ``what`` and the file.
    """
    path = Path(path)
    if path.suffix != ".npy":
        width, height = _open(path, what, verify=True).size
        return height, width
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise InputError(
            f"{what} {path} could not be read ({err}); save it with numpy.save"
        ) from err
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return arr.shape[0], arr.shape[1]
    if arr.ndim != 2:
        raise InputError(f"{what} {path} has shape {arr.shape}; expected a 2-D (H, W) array")
    return arr.shape[0], arr.shape[1]


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``(3, H, W)`` float32 in [0, 1]."""
    return pil_to_tensor_rgb(_open(Path(path), "image"))


def load_mask(path: str | Path) -> torch.Tensor:
    """Read a class-id mask (palette or gray PNG) as ``(H, W)`` int64.

    Palette PNGs keep their indices (VOC convention); RGB masks are refused because
    their colours are not class ids.
    """
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path)
        if arr.ndim != 2:
            raise InputError(f"mask {path} has shape {arr.shape}; a class mask must be 2-D (H, W)")
        return torch.from_numpy(class_ids(arr, what=f"mask {path}"))
    img = _open(path, "mask")
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
    elif img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if not (
            np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
        ):
            raise InputError(
                f"mask {path} is a colour (RGB) image; masks must hold class ids as pixel values. "
                "Save it as a palette ('P') or grayscale ('L') PNG whose pixel values are class ids"
            )
        arr = arr[..., 0]
    else:
        raise InputError(
            f"mask {path} has unsupported mode {img.mode!r}; save it as a palette or grayscale PNG"
        )
    return torch.from_numpy(arr.astype(np.int64))


def load_rgb_codes(path: str | Path, what: str = "panoptic map") -> np.ndarray:
    """Read an RGB-coded id map (COCO panoptic, KITTI-STEP) as ``(H, W, 3)`` int64 channels."""
    img = _open(Path(path), what)
    if img.mode not in ("RGB", "RGBA"):
        raise InputError(
            f"{what} {path} has mode {img.mode!r}; this layout stores ids in the RGB channels "
            "of an RGB PNG (was the file converted?)"
        )
    return np.asarray(img.convert("RGB")).astype(np.int64)


def load_depth(path: str | Path, png_scale: float = DEPTH_PNG_SCALE) -> torch.Tensor:
    """Read a depth map as ``(H, W)`` float32 metres: ``.npy`` in metres or 16-bit PNG in mm."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"depth map {path} does not exist; check the path")
    if path.suffix == ".npy":
        try:
            arr = np.load(path)
        except (ValueError, OSError) as err:
            raise InputError(
                f"depth map {path} could not be read ({err}); save it with numpy.save"
            ) from err
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise InputError(f"depth map {path} has shape {arr.shape}; expected (H, W) in metres")
        return torch.from_numpy(arr.astype(np.float32))
    img = _open(path, "depth map")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise InputError(
            f"depth map {path} has {arr.ndim} dimensions; save it as a single-channel 16-bit PNG in mm"
        )
    return torch.from_numpy(arr.astype(np.float32) / png_scale)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# --------------------------------------------------------------------------- writing


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3)`` uint8, row ``i`` is the colour of class ``i``.

    Definition: the bits of ``i`` are dealt out in turn to red, green and blue (bit 0 to
    red, bit 1 to green, bit 2 to blue, bit 3 to red, ...), each channel filling its
    byte from the most significant bit down. Class 0 is black, 1 dark red, 2 dark green.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ids = np.arange(n, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for level in range(8):  # 8 rounds of 3 bits: unique colours for the first 2**24 ids
        for channel in range(3):
            bit = (ids >> (3 * level + channel)) & 1
            colours[:, channel] |= bit << (7 - level)
    return colours.astype(np.uint8)


def class_ids(mask: Any, what: str = "mask") -> np.ndarray:
    """A ``(H, W)`` mask (tensor or array; integer, bool or integral float) → int64 ids."""
    arr = _numpy(mask)
    if arr.ndim != 2:
        raise InputError(f"{what} has shape {arr.shape}; expected a 2-D (H, W) array of class ids")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"{what} has dtype {arr.dtype}; class ids must be integers")
        bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
        if bad.size:
            raise InputError(
                f"{what} holds {bad.size} non-integer value(s), e.g. {bad.flat[0]:g}; "
                "class ids must be whole numbers: save the mask as integers (numpy .astype(int))"
            )
    return arr.astype(np.int64)


def save_image(path: str | Path, image: Image.Image, **options: Any) -> Path:
    """Write a PIL image as PNG, atomically (parent folders created); ``options`` go to
    ``Image.save`` (e.g. ``pnginfo=``)."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", **options)
    return Path(path)


def save_label_png(path: str | Path, mask: Any) -> Path:
    """Write class ids ``(H, W)`` as a palette PNG (pixel value = class id, VOC colours).

    Ids must lie in 0..255 (255 is the usual ignore index); larger label sets do not fit
    in a PNG palette and should be saved with ``numpy.save`` as ``.npy`` instead.
    """
    ids = class_ids(mask, what=f"mask for {path}")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InputError(
            f"cannot write {path}: class id {bad} is outside 0..255, which a palette PNG can "
            "hold; save the mask as .npy with numpy.save (hbird.io.images.load_mask reads .npy)"
        )
    img = Image.fromarray(ids.astype(np.uint8))
    img.putpalette(voc_palette(256).reshape(-1).tolist())  # 'L' → 'P', values kept
    return save_image(path, img)


def save_id_png16(path: str | Path, ids: Any) -> Path:
    """Write integer ids ``(H, W)`` in 0..65535 as a 16-bit grayscale PNG (values kept),
    e.g. a folder-format panoptic map (class · 1000 + instance)."""
    arr = class_ids(ids, what=f"id map for {path}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise InputError(f"cannot write {path}: ids must lie in 0..65535 for a 16-bit PNG")
    return save_image(path, Image.fromarray(arr.astype(np.uint16)))


def depth_to_png_array(depth_m: Any) -> np.ndarray:
    """Depth ``(H, W)`` in metres → uint16 millimetres, the content of a depth PNG.

    Invalid depths (``<= 0``, NaN, inf) become 0; valid depths are rounded to the nearest
    millimetre, clipped to 1..65535 mm (so a valid depth never turns into the invalid 0).
    """
    d = _numpy(depth_m).astype(np.float64)
    if d.ndim != 2:
        raise InputError(f"depth map has shape {d.shape}; expected (H, W) in metres")
    valid = np.isfinite(d) & (d > 0)
    mm = np.clip(np.round(np.where(valid, d, 0.0) * DEPTH_PNG_SCALE), 1, 65535)
    return np.where(valid, mm, 0).astype(np.uint16)


def save_depth_png(path: str | Path, depth_m: Any) -> Path:
    """Write depth ``(H, W)`` in metres as a 16-bit grayscale PNG in millimetres.

    Depths beyond 65.535 m are clipped; invalid pixels (``<= 0``, NaN, inf) are written as 0.
    """
    try:
        arr = depth_to_png_array(depth_m)
    except InputError as err:
        raise InputError(f"cannot write {path}: {err}") from err
    return save_image(path, Image.fromarray(arr))
