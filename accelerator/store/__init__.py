"""DICOM store: storage area (files) + SQLite index behind one facade."""

from accelerator.store.index import Attachment, Outcome, Resource
from accelerator.store.store import FileToIngest, Store

__all__ = ["Attachment", "FileToIngest", "Outcome", "Resource", "Store"]
