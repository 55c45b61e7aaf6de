"""The REST API of ``hbird serve`` (FastAPI; OpenAPI docs at ``/docs``).

Each route is a few lines calling :class:`~hbird.serve.workspace.Workspace`; no logic
lives here. Clients name images by the names the image list gives, never by path. Bad
input is a 400 whose ``detail`` is the message the CLI gives for the same mistake; a
request body over the upload limit is a 413, refused before it is read whole.

Routes (``{ws}`` is a workspace name: letters, digits, ``-`` and ``_``)::

    GET    /api/workspaces                         names
    GET    /api/workspaces/{ws}                    task, classes, prompt, images
    PUT    /api/workspaces/{ws}/classes            JSON list of names
    POST   /api/workspaces/{ws}/prompt/{image}     multipart "mask": a PNG of class ids
                                                   (depth workspace: a depth map, a
                                                   16-bit PNG in mm or a .npy in metres)
    DELETE /api/workspaces/{ws}/prompt/{image}
    GET    /api/workspaces/{ws}/prediction/{image}.png     palette PNG of class ids (depth:
                                                           16-bit PNG in millimetres)
    GET    /api/workspaces/{ws}/overlay/{image}.png        colours over the image (depth:
                                                           colour-mapped)
    GET    /api/workspaces/{ws}/confidence/{image}.png     8-bit confidence
    POST   /api/workspaces/{ws}/predict-all        mean confidence per image, least first
    GET    /api/workspaces/{ws}/export.zip         prompt folder, masks, bank, settings.json
"""

import io
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from hbird._optional import require
from hbird.errors import InputError
from hbird.io.images import depth_to_png_array, load_image, voc_palette
from hbird.serve.workspace import Workspace
from hbird.viz.overlay import overlay

WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_UPLOAD_BYTES = 32 * 2**20


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_png(labels: Any) -> bytes:
    """``(H, W)`` class ids → palette PNG bytes (as ``hbird predict`` writes them)."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    img.putpalette(voc_palette(256).reshape(-1).tolist())
    return _png(img)


def prediction_png(labels: Any, task: str = "segmentation") -> bytes:
    """A prediction as ``hbird predict`` writes it: a palette PNG of class ids, or a
    16-bit PNG of millimetres for depth (``labels``: ``(H, W)`` metres)."""
    if task == "depth":
        return _png(Image.fromarray(depth_to_png_array(labels)))
    return label_png(labels)


def overlay_png(
    image_path: Path, labels: Any, alpha: float = 0.5, task: str = "segmentation"
) -> bytes:
    """The prediction's colours over the image: class colours (VOC palette), or depth
    through the ``turbo`` colour map (near blue, far red; invalid black)."""
    from hbird.viz.depth import colorize_depth

    image = load_image(image_path)
    if task != "depth":
        return _png(Image.fromarray(overlay(image, labels, alpha, ignore_index=None)))
    rgb = image.permute(1, 2, 0).numpy()
    mixed = (1 - alpha) * rgb + alpha * colorize_depth(np.asarray(labels)) / 255.0
    return _png(Image.fromarray(np.round(mixed * 255).astype(np.uint8)))


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 naming the limit, by
    its Content-Length before anything is read, or as soon as a streamed body passes it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        mib = self.max_bytes / 2**20
        return f"the upload is larger than the limit of {self.max_bytes:,} bytes ({mib:.3g} MiB)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(status_code=413, content={"detail": self.message()})
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI answers an HTTPException from the body
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)


def create_app(
    images: str | Path,
    state: str | Path,
    classes: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    task: str = "segmentation",
):
    """The FastAPI app serving workspaces of the folder ``images`` under ``state/``
    (request bodies up to ``max_upload_bytes``; images and masks up to the pixel limit
    of :func:`hbird.io.images.pixel_limit`, ``--max-pixels``). New workspaces are of
    ``task`` (``"depth"``: prompt labels are depth maps, predictions depth)."""
    fastapi = require("fastapi", "hbird serve")
    from fastapi import File, HTTPException, UploadFile
    from fastapi.responses import JSONResponse, Response

    app = fastapi.FastAPI(title="hbird serve", description=__doc__.split("\n\n")[0])
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    workspaces: dict[str, Workspace] = {}
    opening = threading.Lock()
    state = Path(state)
    for folder in sorted(state.glob("*/")) if state.is_dir() else []:
        if (folder / "workspace.json").is_file():
            workspaces[folder.name] = Workspace(images, folder)

    @app.exception_handler(InputError)
    async def input_error(request, err: InputError):
        return JSONResponse(status_code=400, content={"detail": str(err)})

    def workspace(ws: str) -> Workspace:
        if not WORKSPACE_NAME.match(ws):
            raise HTTPException(400, "workspace names hold letters, digits, - and _ only")
        with opening:  # two first requests for one name must get the same workspace
            if ws not in workspaces:
                workspaces[ws] = Workspace(images, state / ws, classes, settings, task)
            return workspaces[ws]

    app.state.workspace = workspace  # the web page (hbird.serve.page) shares them

    def png(data: bytes) -> Response:
        return Response(content=data, media_type="image/png")

    @app.get("/api/workspaces")
    def list_workspaces() -> list[str]:
        return sorted(workspaces)

    @app.get("/api/workspaces/{ws}")
    def describe(ws: str) -> dict[str, Any]:
        return workspace(ws).describe()

    @app.put("/api/workspaces/{ws}/classes")
    def put_classes(ws: str, names: list[str]) -> list[str]:
        w = workspace(ws)
        w.set_classes(names)
        return w.classes

    @app.post("/api/workspaces/{ws}/prompt/{image}")
    def add_prompt(ws: str, image: str, mask: Annotated[UploadFile, File()]) -> list[str]:
        return workspace(ws).add_prompt(image, mask.file.read())

    @app.delete("/api/workspaces/{ws}/prompt/{image}")
    def remove_prompt(ws: str, image: str) -> list[str]:
        return workspace(ws).remove_prompt(image)

    @app.get("/api/workspaces/{ws}/prediction/{image}.png")
    def prediction(ws: str, image: str) -> Response:
        w = workspace(ws)
        return png(prediction_png(w.predict(image).labels, w.task))

    @app.get("/api/workspaces/{ws}/overlay/{image}.png")
    def overlay(ws: str, image: str) -> Response:
        w = workspace(ws)
        return png(overlay_png(w.image_path(image), w.predict(image).labels, task=w.task))

    @app.get("/api/workspaces/{ws}/confidence/{image}.png")
    def confidence(ws: str, image: str) -> Response:
        values = workspace(ws).predict(image).confidence.clamp(0, 1).numpy()
        return png(_png(Image.fromarray(np.round(values * 255).astype(np.uint8))))

    @app.get("/api/workspaces/{ws}/export.zip")
    def export(ws: str) -> Response:
        """Prompt folder, every image's mask, the bank and settings.json, as one zip."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = workspace(ws).export(Path(tmp) / ws)
            archive = shutil.make_archive(str(Path(tmp) / ws), "zip", folder)
            data = Path(archive).read_bytes()
        headers = {"Content-Disposition": f'attachment; filename="{ws}.zip"'}
        return Response(content=data, media_type="application/zip", headers=headers)

    @app.post("/api/workspaces/{ws}/predict-all")
    def predict_all(ws: str) -> dict[str, float]:
        return workspace(ws).predict_all()

    return app
