"""The transcript viewer at `/ui/`: server-rendered pages, no JavaScript (see `views`)."""
