"""The work folder's disk cap, held at the moment an upload is written: Gradio writes every
upload (a photo, a zip, a model file) through one route, ``POST …/upload``; this ASGI middleware
lets a request in only once :meth:`Models.reserving` has room for the length it declares, and
answers 413 with the reason otherwise (twenty 30 MB uploads were all accepted against a 0.5 GB
cap when the cap was only checked every five minutes)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse

from .state import UNKNOWN_UPLOAD, Models, StorageFull


class UploadGuard:
    """ASGI middleware: ``app_kwargs={"middleware": [Middleware(UploadGuard, registry=...)]}``."""

    def __init__(self, app, registry: Models):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        size = _declared_length(scope) or UNKNOWN_UPLOAD
        reservation = self.registry.reserving(size, "this upload")
        try:
            await run_in_threadpool(reservation.__enter__)  # walks the work folder: not on the event loop
        except StorageFull as err:
            await PlainTextResponse(str(err), status_code=413)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            reservation.__exit__(None, None, None)


def _declared_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None
