"""``hbird serve``: the web page and REST API over workspaces of a folder (hbird.serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOCAL = "127.0.0.1"
PAGE_WORKSPACE = "default"  # the workspace the web page edits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hbird.cli.common import add_max_pixels_argument, add_spec_arguments
    from hbird.specs import BankSpec, SearchConfig

    parser.add_argument("--images", type=Path, help="the folder of images to segment")
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("hbird-serve"),
        help="where workspaces live; a restart with the same folder resumes (default ./hbird-serve)",
    )
    parser.add_argument(
        "--classes",
        help="comma-separated class names of new workspaces (default background,object)",
    )
    parser.add_argument(
        "--task",
        choices=["segmentation", "depth"],
        default="segmentation",
        help="of new workspaces: class masks, or depth maps uploaded as the prompt "
        "(16-bit PNG in mm or .npy in metres) (default segmentation)",
    )
    parser.add_argument(
        "--host", default=LOCAL, help=f"address to bind (default {LOCAL}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve synthetic scenes with the tiny untrained test_vit, offline (a demo)",
    )
    parser.add_argument(
        "--api-only",
        action="store_true",
        help="serve the REST API without the web page (no gradio needed)",
    )
    add_spec_arguments(parser, BankSpec, "memory (how each workspace's bank is built)")
    add_spec_arguments(parser, SearchConfig, "search")
    add_max_pixels_argument(parser)  # the images' and the uploads' pixel limit


def run(args: argparse.Namespace) -> int:
    from hbird.cli.common import given_settings
    from hbird.errors import InputError
    from hbird.specs import BankSpec, SearchConfig

    settings = {**given_settings(args, BankSpec), **given_settings(args, SearchConfig)}
    settings = {k: v for k, v in settings.items() if v is not None}
    if settings.get("shard_bank"):
        raise InputError(
            "--shard-bank splits a saved bank across torchrun processes; hbird serve fits "
            "each workspace's bank in its own process, so drop --shard-bank"
        )
    classes = args.classes.split(",") if args.classes else None
    images = args.images
    if args.demo:
        from hbird.data.synthetic import default_class_names, make_scenes, write_scene_folder

        data = args.state / "demo-data"
        if not (data / "images").is_dir() or (
            args.task == "depth" and not (data / "depth").is_dir()
        ):
            write_scene_folder(data, make_scenes(12, seed=0), with_depth=args.task == "depth")
        images = data / "images"
        classes = classes or list(default_class_names(4))
        settings = {"encoder": "test_vit", "image_size": 64, **settings}
        print("hbird serve --demo: synthetic scenes and a tiny UNTRAINED encoder, offline.")
        if args.task == "depth":
            print(f"hbird serve --demo: depth maps to upload as prompts are in {data / 'depth'}")
    if images is None:
        raise InputError("give --images DIR (the folder to segment), or --demo")
    if args.host != LOCAL:
        print(
            f"warning: --host {args.host} serves your images to other machines; "
            f"hbird serve has no login. Use --host {LOCAL} to keep it local.",
            file=sys.stderr,
        )
    from hbird.serve.app import create_app

    app = create_app(images, args.state, classes, settings, task=args.task)
    url = f"http://{args.host}:{args.port}"
    if not args.api_only:
        app = with_page(app, args.demo)
        print(f"hbird serve: the page is at {url}/ (workspace {PAGE_WORKSPACE!r})")
    import uvicorn

    print(f"hbird serve: REST API at {url}/docs (Ctrl-C stops; state in {args.state})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def with_page(app, demo: bool):
    """Mount the web page at ``/``; without Gradio, ``/`` says how to install it."""
    from hbird._optional import is_available, require

    if is_available("gradio"):
        from hbird.serve.page import mount_page

        export = f"/api/workspaces/{PAGE_WORKSPACE}/export.zip"
        return mount_page(app, app.state.workspace(PAGE_WORKSPACE), demo, export, warm=True)
    try:
        require("gradio", "the hbird serve web page")
    except ImportError as err:
        message = f"{err} (the REST API at /docs works without it; --api-only hides this)"
    print(f"warning: {message}", file=sys.stderr)
    from fastapi.responses import PlainTextResponse

    app.get("/", include_in_schema=False)(lambda: PlainTextResponse(message, status_code=503))
    return app
