"""The transcript viewer at `/ui/`: server-rendered pages, no JavaScript (see `views`)."""

from monitor.server.ui.views import router

__all__ = ["router"]
