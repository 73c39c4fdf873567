"""The web interface: a single-page app (plain HTML, CSS and JavaScript modules, no build step,
no network access needed) served by the API itself at /ui/, talking only to the public REST API
under /api/v1. `install_web(app)` adds its routes; see docs/web.md."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/")
def ui_index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


class _RevalidatedStaticFiles(StaticFiles):
    """Static files that the browser revalidates (ETag) on every load, so an upgraded server
    never runs with yesterday's JavaScript."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def install_web(app: FastAPI) -> None:
    """Serve the web interface: `/` and `/ui` redirect to `/ui/`, assets under `/ui/static/`."""
    app.include_router(router)
    app.mount("/ui/static", _RevalidatedStaticFiles(directory=WEB_DIR / "static"), name="web")
