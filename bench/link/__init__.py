"""bench.link: an emulated slow, lossy link between two network namespaces on this machine.

See link.py for the design (a TUN-to-TUN forwarder in C, since the kernel has no netem) and
``python -m bench.link.validate`` to measure what a profile really gives.
"""
from .link import (
    NOT_ROOT_MESSAGE,
    PROFILES,
    EmulatedLink,
    LinkError,
    LinkProfile,
    build_forwarder,
    cleanup_stale,
    forwarder_version,
    have_root,
    unavailable_reason,
)

__all__ = [
    "NOT_ROOT_MESSAGE",
    "PROFILES",
    "EmulatedLink",
    "LinkError",
    "LinkProfile",
    "build_forwarder",
    "cleanup_stale",
    "forwarder_version",
    "have_root",
    "unavailable_reason",
]
