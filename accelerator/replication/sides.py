"""Naming the two sides of a replication, and opening them.

A side is written the way a user thinks of it, and kept in the job's query in a normalised form:
- `"self"`: this daemon's store → `{"Type": "Self"}`;
- a URL `http(s)://...` of a plain Orthanc → `{"Type": "Orthanc", "Url", "Username", "Password"}`;
  without credentials, those of a configured peer with the same URL are used;
- the name of a configured peer (a plugin or another accelerator) → `{"Type": "Peer", "Peer"}`;
- an Orthanc storage folder (source only), read while that Orthanc is stopped →
  `{"Type": "Folder", "Path", "IndexDirectory"}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accelerator.config import Config, Peer
from accelerator.peers import PeerClient, Peers
from accelerator.replication.ends import InstanceEntry, Selection
from accelerator.replication.job import EndKinds
from accelerator.replication.local import LocalStore
from accelerator.replication.orthanc_folder import OrthancFolderSource
from accelerator.replication.orthanc_rest import LISTING_ANSWER, OrthancRest
from protocol.errors import BadRequest, NetworkProtocol, UnknownResource

TYPES = ("Self", "Orthanc", "Peer", "Folder")
MAX_IDS = 100_000  # instance IDs in one /replication/md5s question


def parse_side(value: Any, role: str, config: Config) -> dict[str, Any]:
    """The normalised side of a job query; `BadRequest` names what is wrong."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "self":
            return {"Type": "Self"}
        if text.startswith(("http://", "https://")):
            return _orthanc({"Url": text}, config)
        if text in config.orthanc_peers:
            return {"Type": "Peer", "Peer": text}
        if role == "Source" and Path(text).is_dir():
            return {"Type": "Folder", "Path": str(Path(text).resolve())}
        raise BadRequest(f"{role} {text!r} is not 'self', a URL, a configured peer"
                         + (" or an Orthanc storage folder" if role == "Source" else ""))
    if not isinstance(value, dict) or value.get("Type") not in TYPES:
        raise BadRequest(f'{role} must be a string or an object with "Type" one of {", ".join(TYPES)}')
    kind = value["Type"]
    if kind == "Self":
        return {"Type": "Self"}
    if kind == "Orthanc":
        return _orthanc(value, config)
    if kind == "Peer":
        if value.get("Peer") not in config.orthanc_peers:
            raise UnknownResource(f"Unknown peer: {value.get('Peer')}")
        return {"Type": "Peer", "Peer": value["Peer"]}
    if role != "Source":
        raise BadRequest("An Orthanc storage folder can only be a source")
    folder = value.get("Path")
    if not isinstance(folder, str) or not Path(folder).is_dir():
        raise BadRequest(f"{role}: no such folder: {folder!r}")
    index = value.get("IndexDirectory") or folder
    if not isinstance(index, str) or not Path(index).is_dir():
        raise BadRequest(f"{role}: no such index folder: {index!r}")
    return {"Type": "Folder", "Path": folder, "IndexDirectory": index}


def _orthanc(value: dict[str, Any], config: Config) -> dict[str, Any]:
    url = value.get("Url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
        raise BadRequest(f"Not an HTTP URL: {url!r}")
    username, password = value.get("Username") or "", value.get("Password") or ""
    if not (isinstance(username, str) and isinstance(password, str)):
        raise BadRequest("Username and Password must be strings")
    if not username:
        for peer in config.orthanc_peers.values():
            if peer.url.rstrip("/") == url.rstrip("/"):
                username, password = peer.username, peer.password
    return {"Type": "Orthanc", "Url": url.rstrip("/") + "/", "Username": username, "Password": password}


def describe(side: dict[str, Any]) -> str:
    """What a user calls the side (never its password)."""
    return {"Self": lambda: "self", "Orthanc": lambda: side["Url"].rstrip("/"),
            "Peer": lambda: f"peer {side['Peer']}", "Folder": lambda: side["Path"]}[side["Type"]]()


class PeerEnd(OrthancRest):
    """A peer that speaks the transfers protocol. Our daemons answer what a replication needs to
    know in one request each (`/replication/entries`, `/replication/md5s`); a real plugin does
    not, and is asked through the Orthanc REST API instead. The bulk goes by pull or push."""

    async def aclose(self) -> None:
        """The client is the daemon's shared client of this peer."""

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        response = await self.client.request("POST", "/replication/entries", json={"Query": selection.to_json()},
                                             accept_statuses=(404,), what="replication entries",
                                             max_body=LISTING_ANSWER, expect_json=True)
        if response.status_code == 404:
            return await super().entries(selection)
        try:
            return [InstanceEntry.from_json(item) for item in response.json()["Instances"]]
        except (KeyError, TypeError, ValueError):
            raise NetworkProtocol(f"{self.name}: malformed /replication/entries answer") from None

    async def md5s(self, instance_ids: Iterable[str], *, settled: bool = False) -> dict[str, str]:
        wanted = list(dict.fromkeys(instance_ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), MAX_IDS):
            part = wanted[start:start + MAX_IDS]
            response = await self.client.request(
                "POST", "/replication/md5s", json={"Instances": part, "Settled": settled}, accept_statuses=(404,),
                what="replication MD5s", max_body=LISTING_ANSWER, expect_json=True)
            if response.status_code == 404:
                return await super().md5s(wanted)
            try:
                answer = response.json()["Instances"]
                found.update({str(k): str(v) for k, v in answer.items() if k in part})
            except (KeyError, TypeError, AttributeError):
                raise NetworkProtocol(f"{self.name}: malformed /replication/md5s answer") from None
        return found

    async def settled_md5s(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """The MD5s of what the peer holds for good (a gateway: what its Orthanc holds)."""
        return await self.md5s(instance_ids, settled=True)


class SideOpener:
    """Opens the ends of a job's query, with the daemon's configuration, peers and store."""

    def __init__(self, config: Config, peers: Peers, store, gateway=None):
        self.config = config
        self.peers = peers
        self.store = store
        self.gateway = gateway

    async def __call__(self, query: dict[str, Any]) -> tuple[Any, Any, EndKinds]:
        source_side, target_side = query["Source"], query["Target"]
        kinds = EndKinds(source_side["Type"], target_side["Type"], target_peer=target_side.get("Peer"),
                         source_peer=source_side.get("Peer"))
        source = await self.open(source_side)
        try:
            return source, await self.open(target_side), kinds
        except BaseException:
            await source.aclose()
            raise

    async def open(self, side: dict[str, Any]):
        kind = side["Type"]
        if kind == "Self":
            return LocalStore(self.store)
        if kind == "Peer":
            return PeerEnd(self.peers.get(side["Peer"]))
        if kind == "Orthanc":
            peer = Peer(name=describe(side), url=side["Url"], username=side["Username"],
                        password=side["Password"])
            return OrthancRest(PeerClient(peer, self.config), max_instance=self.config.transfers.limits.max_instance_size)
        return await OrthancFolderSource.open(Path(side["Path"]), Path(side.get("IndexDirectory") or side["Path"]),
                                              max_size=self.config.transfers.limits.max_instance_size)
