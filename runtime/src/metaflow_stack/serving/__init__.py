"""Serve a bound function over HTTP (FastAPI): ``create_app(reference)``."""

from metaflow_stack.serving.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
