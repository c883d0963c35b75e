"""The HTTP API: Orthanc's core subset, and (later) the /transfers/* and /jobs routes."""

from accelerator.api.app import create_app

__all__ = ["create_app"]
