"""The web page of ``hbird serve``: paint prompt masks, predict, correct (Gradio).

The page is a Gradio ``Blocks`` mounted at ``/`` on the REST app (same process, same
:class:`~hbird.serve.workspace.Workspace` objects). Every button calls one workspace
method; the only code here turns pixels into pictures and back:

- the brush layer of the ImageEditor ``(H·s, W·s, 4)`` RGBA, painted with the class
  palette colours, becomes a ``(H, W)`` mask of class ids (255 where nothing is painted);
- a prediction becomes an overlay (as the REST ``overlay`` route draws it) or a grey
  confidence map.

A depth workspace (``--task depth``) has no brush: each prompt image gets an uploaded
depth map (a 16-bit PNG in millimetres or a ``.npy`` in metres, read and checked as the
CLI reads a depth prompt folder), and predictions are shown through the ``turbo`` colour
map with one colour bar for the page: every picture uses the range of the prompt's depths
(their 2nd-98th percentile, :func:`hbird.viz.depth_range`), which holds the predictions
too, since eq. 1 mixes prompt depths.

Small images are shown ``s`` times larger in the editor (an integer factor, so every
image pixel is an ``s × s`` block of canvas pixels and the mask reads the block centre).
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hbird._optional import require
from hbird.errors import InputError
from hbird.io.images import load_image, voc_palette
from hbird.serve.pictures import PictureFiles, thumbnail
from hbird.serve.pictures import png as png_bytes
from hbird.serve.workspace import IGNORE_INDEX, Workspace
from hbird.viz.colorbar import Scale, colour_bar
from hbird.viz.depth import colorize_depth, depth_range
from hbird.viz.overlay import DEPTH_CMAP, overlay

EDIT_SIZE = 512  # images smaller than this are enlarged by an integer factor to paint
PAINTED_ALPHA = 128  # brush-layer pixels at least this opaque count as painted
LOADED_ALPHA = 176  # a confirmed mask or prediction loaded to edit: see the image through it
DEMO_BANNER = (
    "**Demo**: synthetic scenes and the tiny *untrained* `test_vit` encoder, offline. "
    "The predictions show how the loop works, not how good a trained encoder is."
)
ORDERS = ("name", "least confident first")
DEFAULT_ORDER = ORDERS[1]  # the next image to correct first (by name while none is predicted)
BAR_WIDTH = 360
CONFIDENCE_CMAP = "gray"  # the confidence maps are grey: black = unsure, white = sure
CONFIDENCE_MEANING = {
    "segmentation": "winning class weight",
    "depth": "top neighbour weight",  # decode.py: the closest neighbour's softmax weight
}
DEPTH_UPLOAD = "a depth map: a 16-bit PNG in millimetres or a .npy in metres"


# -- pixels <-> masks -------------------------------------------------------------------
def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8: the palette colour of each class (as masks are saved)."""
    return voc_palette(num_classes)


def hex_colour(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def edit_scale(height: int, width: int) -> int:
    """The integer factor that shows an image at least ``EDIT_SIZE`` px on its long side."""
    return max(1, -(-EDIT_SIZE // max(height, width)))


def mask_from_layer(layer: np.ndarray, num_classes: int, scale: int = 1) -> np.ndarray:
    """A painted brush layer → class ids.

    Args:
        layer: ``(H·scale, W·scale, 4)`` uint8 RGBA, painted with :func:`class_colours`.
        scale: canvas pixels per image pixel (each image pixel reads its block's centre).

    Returns:
        ``(H, W)`` uint8: the class whose colour is nearest (RGB distance) where the layer
        is at least ``PAINTED_ALPHA`` opaque, ``IGNORE_INDEX`` (unlabelled) elsewhere.
    """
    centre = scale // 2
    layer = np.asarray(layer)[centre::scale, centre::scale]
    rgb, alpha = layer[..., :3].astype(np.int64), layer[..., 3]
    colours = class_colours(num_classes).astype(np.int64)
    distance = ((rgb[:, :, None, :] - colours[None, None]) ** 2).sum(-1)  # (H, W, C)
    mask = distance.argmin(-1).astype(np.uint8)
    mask[alpha < PAINTED_ALPHA] = IGNORE_INDEX
    return mask


def layer_from_mask(mask: np.ndarray, scale: int = 1) -> np.ndarray:
    """Class ids ``(H, W)`` → an RGBA brush layer ``(H·scale, W·scale, 4)`` to edit further:
    labelled pixels at ``LOADED_ALPHA`` (counted as painted), unlabelled ones transparent."""
    mask = np.asarray(mask)
    layer = np.zeros((*mask.shape, 4), dtype=np.uint8)
    labelled = mask != IGNORE_INDEX
    layer[labelled, :3] = voc_palette(256)[mask[labelled]]
    layer[labelled, 3] = LOADED_ALPHA
    return layer.repeat(scale, axis=0).repeat(scale, axis=1)


def rgb_array(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 of an image file, as the predictor reads it."""
    return np.round(load_image(path).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def overlay_array(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: the class colours mixed into the image (the REST overlay)."""
    return overlay(image, labels, alpha, ignore_index=None)


def confidence_array(confidence: np.ndarray) -> np.ndarray:
    """``(H, W)`` float confidence in [0, 1] → ``(H, W)`` uint8 grey (white = sure)."""
    return np.round(np.clip(confidence, 0, 1) * 255).astype(np.uint8)


def depth_scale(depths: list[np.ndarray]) -> Scale:
    """The colour scale of a depth page: ``turbo`` over the robust range (2nd-98th
    percentile) of the valid depths of all ``depths`` (``(H, W)`` metres each)."""
    values = np.concatenate([np.asarray(d, dtype=np.float64).ravel() for d in depths])
    return Scale("depth (m)", *(depth_range(values) or (0.0, 1.0)), DEPTH_CMAP)


def depth_picture(depth: np.ndarray, scale: Scale) -> np.ndarray:
    """``(H, W)`` metres → ``(H, W, 3)`` uint8 through ``scale`` (invalid depths black)."""
    return colorize_depth(depth, scale.vmin, scale.vmax, scale.cmap)


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)


# -- the page ---------------------------------------------------------------------------
class PageModel:
    """What the page shows, computed from one workspace (no Gradio here; tested alone).

    ``shown`` is the set of images whose prediction the gallery shows; it is the page
    session's choice (predict one or predict all) and is kept only while the prompt is
    not empty.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.files = PictureFiles()  # every picture the page sends (see hbird.serve.pictures)
        self._files: dict[tuple[str, str], tuple[int, Path]] = {}  # (name, kind) -> file

    def image(self, name: str) -> np.ndarray:
        return rgb_array(self.ws.image_path(name))

    def scale(self, name: str) -> int:
        return edit_scale(*self.image(name).shape[:2])

    def editor_value(self, name: str) -> dict[str, Any]:
        """The ImageEditor value for ``name``: the enlarged image and, for a prompt image,
        its confirmed mask as the brush layer."""
        image = self.image(name)
        s = edit_scale(*image.shape[:2])
        if name in self.ws.prompt:
            mask = np.asarray(Image.open(self.ws.mask_path(name)))
        else:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        return self._editor(image, mask, s)

    def prediction_as_layer(self, name: str) -> dict[str, Any]:
        """The editor value with ``name``'s prediction as the brush layer (to correct it)."""
        image = self.image(name)
        labels = self.ws.predict(name).labels.numpy()
        return self._editor(image, labels, edit_scale(*image.shape[:2]))

    @staticmethod
    def _editor(image: np.ndarray, mask: np.ndarray, s: int) -> dict[str, Any]:
        background = enlarge(image, s)
        return {"background": background, "layers": [layer_from_mask(mask, s)], "composite": None}

    def editor_files(self, value: dict[str, Any]) -> dict[str, Any]:
        """An editor value (:meth:`editor_value`) with its pictures as files, as the page
        sends it (never arrays: see :mod:`hbird.serve.pictures`)."""
        layers = [self.files.picture(layer) for layer in value["layers"]]
        background = self.files.picture(value["background"])
        return {"background": background, "layers": layers, "composite": None}

    def depth_scale(self) -> Scale | None:
        """The depth colour scale of the current prompt (``None`` while it is empty)."""
        if not self.ws.prompt:
            return None
        return depth_scale([np.load(self.ws.mask_path(n)) for n in self.ws.prompt])

    def prompt_depth(self, name: str) -> np.ndarray | None:
        """A prompt image's uploaded depth map through the page's colour scale, or None."""
        if name not in self.ws.prompt:
            return None
        return depth_picture(np.load(self.ws.mask_path(name)), self.depth_scale())

    def save_depth(self, name: str, upload: bytes | None) -> None:
        """Add (or replace) ``name``'s prompt depth map from the uploaded file's bytes."""
        if not upload:
            raise InputError(f"upload {DEPTH_UPLOAD} for {name} first")
        self.ws.add_prompt(name, upload)

    def colour_bar(self, confidence: bool) -> np.ndarray | None:
        """``(h, BAR_WIDTH, 3)`` uint8: the key of the pictures shown (depth in metres, or
        the confidence's 0-1 grey); ``None`` when class colours show (the legend keys them)."""
        if confidence:
            scale = Scale(CONFIDENCE_MEANING[self.ws.task], 0.0, 1.0, CONFIDENCE_CMAP)
        elif self.ws.task == "depth":
            scale = self.depth_scale()
        else:
            scale = None
        return None if scale is None else np.asarray(colour_bar(scale, BAR_WIDTH))

    def save_prompt(self, name: str, editor: dict[str, Any] | None) -> None:
        layers = (editor or {}).get("layers") or []
        if not layers or layers[0] is None:
            raise InputError(f"paint on {name} first (pick a class colour, then brush)")
        mask = mask_from_layer(layers[0], len(self.ws.classes), self.scale(name))
        if (mask == IGNORE_INDEX).all():
            raise InputError(f"nothing is painted on {name}; brush a class colour on it first")
        self.ws.add_prompt(name, png_bytes(mask))

    def view(self, name: str, confidence: bool, scale: Scale | None = None) -> np.ndarray:
        """``name`` with its prediction overlaid (depth: colour-mapped through ``scale``,
        default the prompt's), or its confidence map."""
        prediction = self.ws.predict(name)
        if confidence:
            return confidence_array(prediction.confidence.numpy())
        if self.ws.task == "depth":
            return depth_picture(prediction.labels.numpy(), scale or self.depth_scale())
        return overlay_array(self.image(name), prediction.labels.numpy())

    def gallery_entries(self, shown: set[str], order: str) -> list[tuple[str, bool, str]]:
        """``(name, predicted, caption)`` of every image, in ``order``: predicted images
        (those in ``shown``, while the prompt is not empty) carry their mean confidence."""
        shown = shown if self.ws.prompt else set()
        scores = {n: float(self.ws.predict(n).confidence.mean()) for n in sorted(shown)}
        names = self.ws.image_names
        if order == ORDERS[1]:
            names = sorted(names, key=lambda n: (n not in scores, scores.get(n, 0.0), n))
        entries = []
        for name in names:
            caption = name + (f" · {scores[name]:.2f}" if name in scores else "")
            if name in self.ws.prompt:
                caption += " · prompt"
            entries.append((name, name in scores, caption))
        return entries

    def gallery(
        self, shown: set[str], confidence: bool, order: str
    ) -> tuple[list[tuple[np.ndarray, str]], list[str]]:
        """Gallery items ``(picture, caption)`` and the image name of each, in ``order``.

        Predicted images show their overlay (or confidence) and mean confidence; the
        others show the plain image."""
        with self.ws.lock:
            entries = self.gallery_entries(shown, order)
            scale = self._page_scale(entries)
            items = [
                (self.view(n, confidence, scale) if predicted else self.image(n), caption)
                for n, predicted, caption in entries
            ]
        return items, [n for n, _, _ in entries]

    def gallery_files(
        self, shown: set[str], confidence: bool, order: str
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """:meth:`gallery` as picture files, what the page sends: each picture is drawn
        and encoded once per workspace revision (a plain image once for good), and shrunk
        when larger than :data:`~hbird.serve.pictures.THUMBNAIL_SIZE` (see
        :func:`~hbird.serve.pictures.thumbnail`); files no revision shows any more are
        swept after a grace period (:class:`~hbird.serve.pictures.PictureFiles`)."""
        with self.ws.lock:  # no prompt change between a picture and its revision
            entries = self.gallery_entries(shown, order)
            scale = functools.cache(lambda: self._page_scale(entries))
            items = []
            for name, predicted, caption in entries:
                kind = ("confidence" if confidence else "prediction") if predicted else "image"
                revision = self.ws.revision if predicted else 0
                cached = self._files.get((name, kind))
                if cached is None or cached[0] != revision:
                    if predicted:
                        picture = self.view(name, confidence, scale())
                    else:
                        picture = self.image(name)
                    path = self.files.add(*thumbnail(picture))
                    cached = self._files[(name, kind)] = (revision, path)
                else:
                    self.files.hand(cached[1])  # handed out again: its grace starts again
                items.append((str(cached[1]), caption))
            self.files.sweep(path for _, path in self._files.values())
        return items, [n for n, _, _ in entries]

    def first_paint(self, demo: bool = False) -> str:
        """The page's first paint (:mod:`hbird.serve.first_paint`): the gallery the page
        opens with, as HTML: the predictions already made at the current revision (the
        others plain), in :data:`DEFAULT_ORDER`, with their captions."""
        from hbird.serve.first_paint import first_paint_html

        items, _ = self.gallery_files(set(self.ws.predicted_names()), False, DEFAULT_ORDER)
        label = f"the folder ({DEFAULT_ORDER})"
        return first_paint_html(heading(self.ws.task), label, items, DEMO_BANNER if demo else None)

    def _page_scale(self, entries) -> Scale | None:
        predicted = any(p for _, p, _ in entries)
        return self.depth_scale() if self.ws.task == "depth" and predicted else None

    def status(self) -> str:
        todo = "upload a depth map for" if self.ws.task == "depth" else "paint a mask on"
        prompt = ", ".join(self.ws.prompt) or f"empty: {todo} an image, then add it"
        return f"**Prompt** ({len(self.ws.prompt)}): {prompt}"


def heading(task: str) -> str:
    """The page's title line."""
    if task == "depth":
        return "hbird serve: upload a few depth maps, see every other image's depth"
    return "hbird serve: paint a few masks, see every other image segmented"


def legend_html(classes: list[str]) -> str:
    """Class names beside their brush colours."""
    swatches = [
        f'<span class="hbird-class"><span class="hbird-swatch" style="background:'
        f'{hex_colour(c)}"></span>{i}: {name}</span>'
        for i, (name, c) in enumerate(zip(classes, class_colours(len(classes))))
    ]
    return '<div id="legend">' + " ".join(swatches) + "</div>"


CSS = """
#demo-banner {background: #fff3cd; border: 1px solid #e0c36c; padding: 6px 12px;}
.hbird-class {margin-right: 14px; white-space: nowrap;}
.hbird-swatch {display: inline-block; width: 14px; height: 14px; margin-right: 4px;
  border: 1px solid #888; vertical-align: middle;}
"""


DEPTH_CONFIDENCE = (
    "**show confidence** shows the *top neighbour weight*: the softmax weight (eq. 1) of "
    "the prompt patch closest to each query patch. White: one neighbour decides the depth; "
    "dark: it is an average over many neighbours that agree less."
)


def _class_editor(gr, model: PageModel, name: str, classes: list[str]):
    """The brush editor over ``name`` (segmentation), with the class colours' legend."""
    colours = [hex_colour(c) for c in class_colours(len(classes))]
    first = model.editor_value(name)
    gr.HTML(legend_html(classes))
    return gr.ImageEditor(
        value=model.editor_files(first),
        # the canvas starts at the first image's size: Gradio places value layers relative
        # to the starting canvas, so a layer of another size would land off the image
        canvas_size=first["background"].shape[1::-1],
        label="paint the prompt mask (brush colour = class; eraser un-labels)",
        type="numpy",
        image_mode="RGBA",
        format="png",
        height=620,
        sources=(),
        transforms=(),
        layers=False,
        brush=gr.Brush(
            colors=colours, default_color=colours[1], color_mode="fixed", default_size=24
        ),
        eraser=gr.Eraser(default_size=24),
        elem_id="editor",
    )


def _depth_inputs(gr, model: PageModel, name: str) -> list:
    """The image, its prompt depth map (if any) and the depth map upload (depth)."""
    with gr.Row():
        image = gr.Image(label="image", interactive=False, height=360, elem_id="depth-image")
        prompt = gr.Image(
            label="its prompt depth map", interactive=False, height=360, elem_id="prompt-depth"
        )
    upload = gr.File(
        label=DEPTH_UPLOAD + " (the image's size; 0 = no depth)",
        file_types=[".png", ".npy"],
        type="binary",
        elem_id="depth-upload",
    )
    return [image, prompt, upload]


def build_page(
    workspace: Workspace,
    demo: bool = False,
    export_url: str | None = None,
    model: PageModel | None = None,
):
    """The Gradio ``Blocks`` over ``workspace`` (element ids are what the browser test uses;
    ``model``: the page model to share, default a new one)."""
    gr = require("gradio", "the hbird serve web page")
    model = model or PageModel(workspace)
    names = workspace.image_names
    depth = workspace.task == "depth"

    def guarded(fn: Callable) -> Callable:
        """Show an InputError's message on the page instead of failing the request."""

        @functools.wraps(fn)  # Gradio reads the signature (Progress, SelectData)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except InputError as err:
                raise gr.Error(str(err)) from None

        return call

    sent = model.files.picture  # every picture goes out as a file (hbird.serve.pictures)

    def input_values(name: str) -> tuple:
        """What the prompt inputs show for ``name``: the editor with its confirmed mask, or
        the image, its prompt depth map and an empty upload."""
        if not depth:
            return (model.editor_files(model.editor_value(name)),)
        s = model.scale(name)
        prompt_depth = model.prompt_depth(name)
        prompt_depth = None if prompt_depth is None else enlarge(prompt_depth, s)
        return sent(enlarge(model.image(name), s)), sent(prompt_depth), None

    with gr.Blocks(title="hbird serve", analytics_enabled=False) as page:
        gr.Markdown(f"# {heading(workspace.task)}")
        if demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        shown = gr.State(set())  # images whose prediction this session shows
        order_names = gr.State(names)  # the gallery's image names, in its order
        with gr.Row():
            with gr.Column(scale=3):
                current = gr.Dropdown(names, value=names[0], label="image", elem_id="image")
                if depth:
                    inputs = _depth_inputs(gr, model, names[0])
                else:
                    inputs = [_class_editor(gr, model, names[0], workspace.classes)]
                with gr.Row():
                    add = gr.Button("add to prompt", variant="primary", elem_id="add-prompt")
                    remove = gr.Button("remove from prompt", elem_id="remove-prompt")
                    if not depth:
                        correct = gr.Button("correct the prediction", elem_id="correct")
                status = gr.Markdown(model.status(), elem_id="status")
            with gr.Column(scale=2):
                prediction = gr.Image(
                    label="prediction", interactive=False, height=360, elem_id="prediction"
                )
                bar = gr.Image(
                    label="colour scale",
                    interactive=False,
                    visible=False,
                    show_label=False,
                    elem_id="colour-bar",
                )
                with gr.Row():
                    predict = gr.Button("predict", elem_id="predict")
                    predict_all = gr.Button("predict all", variant="primary", elem_id="predict-all")
                with gr.Row():
                    confidence = gr.Checkbox(label="show confidence", elem_id="confidence")
                    order = gr.Radio(
                        list(ORDERS), value=DEFAULT_ORDER, label="order", elem_id="order"
                    )
                if depth:
                    gr.Markdown(DEPTH_CONFIDENCE)
                if export_url:
                    gr.Markdown(f"[export masks, bank and settings (zip)]({export_url})")
        gallery = gr.Gallery(
            value=model.gallery_files(set(), False, DEFAULT_ORDER)[0],
            label="the folder (click an image to " + ("give it depth)" if depth else "paint it)"),
            columns=6,
            allow_preview=False,
            elem_id="gallery",
        )

        views = [prediction, bar, gallery, order_names, status]

        def refresh(name, shown_now, conf, order_now):
            """The prediction of ``name`` (if shown) and its colour bar, the gallery, its
            order, the status."""
            items, in_order = model.gallery_files(shown_now, conf, order_now)
            view = key = None
            if workspace.prompt:
                key = model.colour_bar(conf)
                if name in shown_now:
                    view = enlarge(model.view(name, conf), model.scale(name))
            bar_now = gr.Image(value=sent(key), visible=key is not None)
            return sent(view), bar_now, items, in_order, model.status()

        @guarded
        def on_select(name, shown_now, conf, order_now):
            return *input_values(name), *refresh(name, shown_now, conf, order_now)

        def on_gallery_select(in_order, evt: gr.SelectData):
            return in_order[evt.index]

        @guarded
        def on_add(name, value, shown_now, conf, order_now):
            if depth:  # the upload's bytes
                model.save_depth(name, value)
                return *input_values(name), *refresh(name, shown_now, conf, order_now)
            model.save_prompt(name, value)  # the editor's layers
            return refresh(name, shown_now, conf, order_now)

        @guarded
        def on_remove(name, shown_now, conf, order_now):
            workspace.remove_prompt(name)
            return *input_values(name), *refresh(name, shown_now, conf, order_now)

        @guarded
        def on_predict(name, shown_now, conf, order_now):
            shown_now = shown_now | {name}
            workspace.predict(name)
            return shown_now, *refresh(name, shown_now, conf, order_now)

        @guarded
        def on_predict_all(name, conf, order_now, progress=gr.Progress()):  # noqa: B008 (Gradio's API)
            progress((0, len(names)), desc="predicting", unit="images")
            workspace.predict_all(progress=lambda i, n: progress((i, n), unit="images"))
            shown_now = set(workspace.image_names)
            return shown_now, *refresh(name, shown_now, conf, order_now)

        state = [current, shown, confidence, order]
        # a reload shows the current prompt and the predictions already made at its revision
        # (as the first paint does); it leaves the depth upload alone (its answer can come
        # after the user picked a file, on a loaded machine)
        shown_inputs = inputs[:-1] if depth else inputs

        @guarded
        def on_load(name, shown_now, conf, order_now):
            shown_now = shown_now | set(workspace.predicted_names())
            values = input_values(name)[: len(shown_inputs)]
            return *values, shown_now, *refresh(name, shown_now, conf, order_now)

        page.load(on_load, state, [*shown_inputs, shown, *views])
        current.change(on_select, state, [*inputs, *views])
        gallery.select(on_gallery_select, [order_names], [current])
        added = [*inputs, *views] if depth else views
        add.click(on_add, [current, inputs[-1], shown, confidence, order], added)
        remove.click(on_remove, state, [*inputs, *views])
        if not depth:

            @guarded
            def on_correct(name):
                return model.editor_files(model.prediction_as_layer(name))

            correct.click(on_correct, [current], inputs)
        predict.click(on_predict, state, [shown, *views])
        predict_all.click(on_predict_all, [current, confidence, order], [shown, *views])
        for control in (confidence, order):
            control.change(guarded(refresh), state, views)
    return page


def mount_page(
    app,
    workspace: Workspace,
    demo: bool = False,
    export_url: str | None = None,
    first_paint: bool = True,
    warm: bool = False,
):
    """Serve the page at ``/`` of the FastAPI ``app`` (REST routes and ``/docs`` stay).

    With ``first_paint`` the page's HTML carries its gallery, shown before Gradio's client
    has started (:mod:`hbird.serve.first_paint`), and its pictures are served under
    ``/page/pictures/``; ``warm`` draws its pictures in the background now
    (:func:`~hbird.serve.first_paint.serve_first_paint`), as ``hbird serve`` does."""
    gr = require("gradio", "the hbird serve web page")
    model = PageModel(workspace)
    page = build_page(workspace, demo, export_url, model)
    if first_paint:
        from hbird.serve.first_paint import serve_first_paint

        serve_first_paint(app, model.files, lambda: model.first_paint(demo), warm=warm)
    return gr.mount_gradio_app(app, page, path="/", css=CSS, footer_links=["api"])
