"""Replication between Orthanc servers, and gateway mode (issue 11)."""
