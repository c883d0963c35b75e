"""accelerator: a peer daemon speaking the Orthanc Transfers Accelerator protocol."""

__version__ = "0.1.0"
