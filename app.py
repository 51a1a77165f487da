"""Atelier's entry point: read the flags, build the Gradio app from ui/, launch it."""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split
import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr

    from ui.context import AppContext

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# How long Gradio's queue loops sleep between looks at an empty queue. Gradio's own values for Windows; elsewhere
# it uses 1 ms and 10 ms, which woke the server ~1100 times a second with nobody connected (~5% of a core idle).
# The cost: an event waits up to 50 ms more before it starts, progress messages go out every 100 ms.
QUEUE_IDLE_SECONDS = 0.05
PROGRESS_IDLE_SECONDS = 0.1
log = logging.getLogger("atelier")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py", description="Atelier: train SD 1.5 LoRAs on your own images and generate with them."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="make a public Gradio share link (requires --auth)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this user name and password to open the app")
    parser.add_argument(
        "--demo", action="store_true", help="preload the tiny demo model and demo dataset (CPU-friendly)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("output"),
        help="where runs, uploads, generated images and tool outputs are written (default: output)",
    )
    parser.add_argument(
        "--datasets-dir",
        type=Path,
        action="append",
        metavar="DIR",
        help="a folder the app may read datasets from and write captions into; repeat for more "
        "(default: datasets). Paths typed into the app must lie inside these folders or --output-dir",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        metavar="DIR",
        help="a folder the app may read base models, VAEs, LoRAs and ControlNets from; repeat for more "
        "(default: models). Hugging Face ids (org/name) are always allowed",
    )
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    return parser.parse_args(argv)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must be USER:PASS with both parts non-empty, e.g. --auth alice:s3cret")
    return user, password


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> None:
    """Refuse to expose an unprotected app: it can read and write files on this machine."""
    exposed = share or host not in LOCAL_HOSTS
    if not exposed:
        return
    where = "a public share link" if share else f"host {host}"
    if auth is None:
        raise SystemExit(
            f"Refusing to serve on {where} without a password: anyone who reaches it could read your files "
            "and use your GPU. Add --auth USER:PASS, or drop --share / use --host 127.0.0.1."
        )
    log.warning("Serving on %s: other machines can reach this app (protected by --auth).", where)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    check_exposure(args.host, args.share, auth)

    from ui.context import AppContext
    from ui.dataset_tab import CSS
    from ui.http_headers import security_middleware
    from ui.shell import build_app

    context = AppContext.create(
        output_dir=args.output_dir,
        demo=args.demo,
        datasets=args.datasets_dir or [Path("datasets")],
        models=args.models_dir or [Path("models")],
    )
    for kind in ("datasets", "models", "output"):
        log.info("Folders for %s: %s", kind, context.workspace.allowed(kind))
    app = build_app(context)
    continue_queue(context)
    quiet_queue(app.queue())
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        inbrowser=not args.no_browser,
        css=CSS,
        prevent_thread_lock=True,  # Gradio's own wait polls every 0.1 s; `serve_until_interrupted` just waits
        app_kwargs={"middleware": security_middleware()},  # CSP, no framing, nosniff: ui/http_headers.py
    )
    serve_until_interrupted(app)


def continue_queue(context: AppContext) -> None:
    """Train what the queue file still holds (an app killed mid-queue resumes its interrupted run); a queue another
    process trains, or a damaged file, is left as it is with a warning."""
    from core.training.queue import QueueError

    try:
        context.queue.continue_unfinished()
    except QueueError as error:
        log.warning("The queue is not continued: %s", error)


def quiet_queue(app: gr.Blocks) -> None:
    """Let Gradio's queue sleep between looks at an empty queue, so an app nobody uses costs next to nothing.

    Gradio offers no option for it; these are attributes its loops read on every pass (gradio is pinned to 6.31,
    and tests/test_app.py counts the server's wake-ups with no page open, so a change there shows).
    """
    queue = app._queue
    queue.sleep_when_free = QUEUE_IDLE_SECONDS
    queue.progress_update_sleep_when_free = PROGRESS_IDLE_SECONDS


def serve_until_interrupted(app: gr.Blocks) -> None:
    """Block the main thread until Ctrl+C without waking up, then close the server (Gradio ends a share link's
    tunnel at exit)."""
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("Ctrl+C: closing the server.")
    finally:
        app.close()


if __name__ == "__main__":
    main(sys.argv[1:])
