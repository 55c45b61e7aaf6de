"""The page's first paint: its gallery as plain HTML in the page's own HTML.

Gradio renders its page only once its client is in: 57 script chunks, parsed by the
browser one layer after another, 1.1-2 s on a loaded 2-core CPU before the first gallery
picture shows (docs/serve.md). So the HTML of ``/`` carries the gallery itself: the
pictures of the workspace's current revision (the content-named files the page hands
Gradio, :meth:`hbird.serve.page.PageModel.gallery_files`), in the page's order, each with
its caption (name, mean confidence), visible at once without any script. When Gradio's
client has rendered its own gallery, a CSS rule hides this one: the interactive page
takes over in place.

- :func:`first_paint_html` draws the block (names escaped);
- :class:`FirstPaint` is the ASGI middleware that puts it into Gradio's HTML of ``/``;
- the pictures are served by bare file name under :data:`PICTURE_ROUTE`, only files the
  page holds (:meth:`hbird.serve.pictures.PictureFiles.held`): no path from the client.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hbird.serve.pictures import MEDIA_TYPES, PictureFiles

BLOCK_ID = "hbird-first-paint"
PICTURE_ROUTE = "page/pictures"  # relative to the page, which may sit under a root path
EAGER_PICTURES = 18  # the first rows load at once; the rest when scrolled near (lazy)
GRADIO_APP_TAG = b"<gradio-app"  # the first paint goes just before Gradio's element
ELEMENT_TIMING = "hbird-first-paint"  # Chromium's Element Timing names the paint by this

CSS = f"""
#{BLOCK_ID} {{font-family: system-ui, sans-serif; color: #1f2937; box-sizing: border-box;
  width: 100%; max-width: 1280px; margin: 0 auto; padding: 8px 16px;}}
#{BLOCK_ID} h1 {{font-size: 1.6em; margin: 8px 0;}}
#{BLOCK_ID} .hbird-banner {{background: #fff3cd; border: 1px solid #e0c36c; padding: 6px 12px;}}
#{BLOCK_ID} .hbird-note {{color: #6b7280;}}
#{BLOCK_ID} .hbird-grid {{display: grid; gap: 8px;
  grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));}}
#{BLOCK_ID} figure {{margin: 0; border: 1px solid #e5e7eb; border-radius: 6px;
  overflow: hidden;}}
#{BLOCK_ID} img {{display: block; width: 100%; aspect-ratio: 1; object-fit: contain;
  background: #f3f4f6;}}
#{BLOCK_ID} figcaption {{font-size: 0.8em; padding: 2px 6px; overflow-wrap: anywhere;}}
body:has(#gallery img) #{BLOCK_ID} {{display: none;}}
"""
"""The block's style; its last rule hands over to Gradio's gallery (``#gallery``) once
that holds a picture."""


def markdown_inline(text: str) -> str:
    """The inline Markdown the page's texts use (``**bold**``, ``*italic*``, `` `code` ``)
    as HTML, everything else escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", text)


def first_paint_html(
    heading: str,
    label: str,
    items: Sequence[tuple[str | Path, str]],
    banner: str | None = None,
) -> str:
    """The first paint's block.

    Args:
        heading: the page's title (plain text).
        label: the gallery's label (plain text).
        items: ``(picture file, caption)`` per gallery entry, in order (the page's
            :meth:`~hbird.serve.page.PageModel.gallery_files`); only each file's bare
            name goes into the HTML.
        banner: inline Markdown shown above the gallery (the demo's notice), or ``None``.
    """
    figures = []
    for i, (path, caption) in enumerate(items):
        src = f"{PICTURE_ROUTE}/{html.escape(Path(path).name)}"
        text = html.escape(caption)
        lazy = "" if i < EAGER_PICTURES else ' loading="lazy"'
        figures.append(
            f'<figure><img src="{src}" alt="{text}" elementtiming="{ELEMENT_TIMING}"{lazy}>'
            f"<figcaption>{text}</figcaption></figure>"
        )
    notice = "" if banner is None else f'<p class="hbird-banner">{markdown_inline(banner)}</p>'
    return (
        f'<div id="{BLOCK_ID}"><style>{CSS}</style><h1>{html.escape(heading)}</h1>{notice}'
        '<p class="hbird-note">the editor is loading; the gallery below is the workspace '
        f"as it is now.</p><p>{html.escape(label)}</p>"
        f'<div class="hbird-grid">{"".join(figures)}</div></div>'
    )


class FirstPaint:
    """ASGI middleware: the HTML page ``GET /`` answers (Gradio's) gets ``render()``'s
    block inserted just before its ``<gradio-app>`` element.

    ``render`` runs in a worker thread, once per page request (it reads the workspace at
    its current revision). The request goes on without ``Accept-Encoding``, so the HTML
    comes back uncompressed and can be edited; any other response passes untouched.
    """

    def __init__(self, app: Any, render: Callable[[], str]) -> None:
        self.app, self.render = app, render

    def is_page(self, scope: dict) -> bool:
        root = scope.get("root_path", "")
        return (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] in ("/", root + "/")
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.is_page(scope):
            return await self.app(scope, receive, send)
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import MutableHeaders

        block = (await run_in_threadpool(self.render)).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
        start: dict = {}
        chunks: list[bytes] = []

        async def edited(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            response_headers = MutableHeaders(raw=list(start["headers"]))
            is_html = response_headers.get("content-type", "").startswith("text/html")
            if start["status"] == 200 and is_html and "content-encoding" not in response_headers:
                body = body.replace(GRADIO_APP_TAG, block + GRADIO_APP_TAG, 1)
                response_headers["content-length"] = str(len(body))
            await send({**start, "headers": response_headers.raw})
            await send({"type": "http.response.body", "body": body})

        await self.app({**scope, "headers": headers}, receive, edited)


def serve_first_paint(
    app: Any, files: PictureFiles, render: Callable[[], str], warm: bool = False
) -> None:
    """Give the FastAPI ``app``'s page (``GET /``, mounted after this) the block
    ``render()`` draws (:class:`FirstPaint`), and serve the pictures it names from
    ``files`` at ``/page/pictures/<file name>``: only files ``files`` holds, by bare name
    (anything else is a 404), cached for good by the browser (named by content).

    ``warm``: call ``render()`` once now, in a background thread
    (``app.state.first_paint_warmup``), so the pictures of the workspace as it opens
    (overlays of a resumed ``--state`` included) are drawn before the first page request
    rather than during it (3-4 s for 100 overlays here). An error there is left to that
    request, which reports it as it would without the warm-up."""
    from fastapi import HTTPException
    from fastapi.responses import Response

    @app.get(f"/{PICTURE_ROUTE}/{{name}}", include_in_schema=False)
    def first_paint_picture(name: str) -> Response:
        path = files.held(name)
        try:
            data = None if path is None else path.read_bytes()
        except FileNotFoundError:  # swept since: the page that named it is stale
            data = None
        if data is None:
            raise HTTPException(404, f"no picture {name!r} on the page now; reload the page")
        cache = {"Cache-Control": "public, max-age=31536000, immutable"}
        return Response(data, media_type=MEDIA_TYPES[path.suffix], headers=cache)

    app.add_middleware(FirstPaint, render=render)
    if warm:
        app.state.first_paint_warmup = threading.Thread(
            target=_drawn_quietly, args=(render,), name="hbird-first-paint", daemon=True
        )
        app.state.first_paint_warmup.start()


def _drawn_quietly(render: Callable[[], str]) -> None:
    try:
        render()
    except Exception:  # noqa: BLE001 - the first page request draws again and reports it
        pass
