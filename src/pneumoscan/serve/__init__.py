"""The web service and browser page: ``create_app(run_dir)`` builds the FastAPI app."""

from pneumoscan.serve.app import MAX_PIXELS, MAX_UPLOAD_BYTES, create_app

__all__ = ["MAX_PIXELS", "MAX_UPLOAD_BYTES", "create_app"]
