"""Bounds on what one transfer may declare, checked before anything is allocated or planned.

A push plan (receiver side) and a lookup answer (puller side) both come from another host and
declare instance counts and sizes that decide how much disk is reserved, how many buckets are
planned and how long a commit runs. The plugin trusts them; we refuse, with a 400 that names the
configuration option, any transfer beyond these limits (`Transfers.MaxTransferInstances`,
`MaxInstanceSize`, `MaxTransferSize`). Whether the disk has room is the daemon's question
(`FullStorage`, 507), not this pure module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import ParameterOutOfRange
from protocol.messages import InstanceInfo

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TransferLimits:
    max_instances: int = 50_000
    max_instance_size: int = 16384 * MIB  # bytes
    max_total_size: int = 1024 * 1024 * MIB  # bytes
    max_chunks: int = 1_000_000  # chunks in a push plan (a plan is a list of them)

    def check(self, instances: Sequence[InstanceInfo], what: str) -> int:
        """Raise ParameterOutOfRange for a transfer beyond the limits; returns its total size."""
        if len(instances) > self.max_instances:
            raise ParameterOutOfRange(
                f"{what} declares {len(instances)} instances, more than Transfers.MaxTransferInstances "
                f"({self.max_instances})")
        total = 0
        for info in instances:
            if info.size > self.max_instance_size:
                raise ParameterOutOfRange(
                    f"{what} declares instance {info.id} of {info.size} bytes, more than "
                    f"Transfers.MaxInstanceSize ({self.max_instance_size // MIB} MiB)")
            total += info.size
        if total > self.max_total_size:
            raise ParameterOutOfRange(
                f"{what} declares {total} bytes, more than Transfers.MaxTransferSize "
                f"({self.max_total_size // MIB} MiB)")
        return total

    def check_chunks(self, count: int, what: str) -> None:
        if count > self.max_chunks:
            raise ParameterOutOfRange(f"{what} has {count} chunks, more than {self.max_chunks}")
