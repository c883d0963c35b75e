"""Access to ../shared/wire-samples: traffic captured from a real Orthanc + transfers plugin.

Tests replay a captured request against our app and compare what matters to clients: status,
the headers that matter, and the JSON (recorded keys must be present with the same values, except
the keys the capture README lists as random). The folder is beside the repository in CI; on a
machine without it, these tests skip with a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "wire-samples"

# Random per run in the captures (README section 5).
RANDOM_KEYS = {"ID", "Path", "Originator", "RemoteJob", "URL", "CreationTime", "CompletionTime",
               "Timestamp", "EffectiveRuntime", "NetworkSpeedKBs", "LastUpdate", "FileUuid",
               "EstimatedTimeOfArrival", "IsStable"}


def require_samples() -> Path:
    if not (SAMPLES / "README.md").is_file():
        pytest.skip(f"wire samples not found at {SAMPLES} (the shared folder beside the repository)")
    return SAMPLES


@dataclass(frozen=True)
class Exchange:
    folder: Path
    record: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.record["seq"]

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def target(self) -> str:
        return self.record["target"]

    @property
    def status(self) -> int:
        return self.record["status"]

    def request_headers(self) -> dict[str, str]:
        skip = {"host", "content-length", "user-agent", "accept"}
        return {k: v for k, v in self.record["request"]["headers"] if k.lower() not in skip}

    def response_header(self, name: str) -> str | None:
        for k, v in self.record["response"]["headers"]:
            if k.lower() == name.lower():
                return v
        return None

    def _body(self, side: str) -> bytes:
        body = self.record[side]["body"]
        if body["size"] == 0:
            return b""
        stream = (self.folder / body["stream"]).read_bytes()
        return stream[body["stream_offset"] : body["stream_offset"] + body["size"]]

    def request_body(self) -> bytes:
        return self._body("request")

    def response_body(self) -> bytes:
        return self._body("response")

    def response_json(self) -> Any:
        return self.record["response"]["body"].get("json")


@cache
def exchanges(folder: str) -> tuple[Exchange, ...]:
    base = require_samples() / folder
    index = json.loads((base / "index.json").read_text())
    return tuple(Exchange(base, e) for e in index["exchanges"])


def exchange(folder: str, seq: int) -> Exchange:
    return next(e for e in exchanges(folder) if e.seq == seq)


@cache
def dataset(out_dir: str) -> dict[str, Any]:
    """Build the samples' dataset (make_dataset.py) into `out_dir`; returns its manifest."""
    script = require_samples() / "make_dataset.py"
    subprocess.run([sys.executable, str(script), out_dir], check=True, capture_output=True)
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def assert_json_matches(recorded: Any, ours: Any, path: str = "$") -> None:
    """Every recorded key is in our answer with the same value (random keys: same type only)."""
    if isinstance(recorded, dict):
        assert isinstance(ours, dict), f"{path}: expected an object, got {ours!r}"
        for key, value in recorded.items():
            assert key in ours, f"{path}: missing key {key!r}"
            if key in RANDOM_KEYS:
                assert type(ours[key]) is type(value) or value is None, f"{path}.{key}: type differs"
            else:
                assert_json_matches(value, ours[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        assert isinstance(ours, list) and len(ours) == len(recorded), f"{path}: {ours!r} != {recorded!r}"
        for i, (r, o) in enumerate(zip(recorded, ours)):
            assert_json_matches(r, o, f"{path}[{i}]")
    else:
        assert ours == recorded, f"{path}: {ours!r} != {recorded!r}"
