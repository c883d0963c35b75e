"""The bucket planner of the transfers protocol (spec section 5), exactly as the C++ plugin.

The driver of a job (puller or pusher) cuts the instances into buckets, one HTTP request each.
Reproducing the plugin's plan exactly keeps our request pattern, sizes and URLs identical to a
real peer's, which the captured wire samples let us verify.

With T = bucket size and S = 2T, instances taken in ascending ID order are
  small  (n < T):      deferred, then grouped in ID order;
  medium (T <= n < S): one bucket with the whole instance;
  large  (n >= S):     k = ceil(n/S) buckets of c = floor(n/k) bytes, the last one absorbing the
                       remainder.
Medium and large buckets come first, then the groups. A group closes after an append when its
total is >= T or, in pull mode only, when `len(base_url + chunk_uri(group)) >= 1956`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from protocol.chunks import chunk_uri
from protocol.messages import COMPRESSIONS, Bucket, Chunk, InstanceInfo

MAX_PULL_URL_LENGTH = 2000 - 44  # the plugin keeps URLs under 2000 chars, minus one Orthanc ID

Instances = Mapping[str, int] | Iterable[tuple[str, int]] | Iterable[InstanceInfo]


MIN_ADAPTIVE_BUCKET = 256 * 1024
BUCKETS_PER_WORKER = 6  # in units of T; groups close between T and 2T, so at least 4 real ones
TAPER_PIECES = 4  # each bucket of the last round is cut into this many
MIN_TAPERED_PIECE = 64 * 1024


def adaptive_bucket_size(total_size: int, bucket_size: int, workers: int) -> int:
    """A bucket size for this transfer that gives every worker several buckets (at least 4), so
    that no worker idles while the last buckets crawl over a slow link.

    Only ever smaller than the configured size, never below MIN_ADAPTIVE_BUCKET; the plan is
    still the plugin's algorithm with another T, which any peer accepts. Large transfers keep
    the configured size exactly.
    """
    wanted = total_size // (max(1, workers) * BUCKETS_PER_WORKER)
    return max(min(bucket_size, MIN_ADAPTIVE_BUCKET), min(bucket_size, wanted))


def taper(buckets: list[Bucket], workers: int, pieces: int = TAPER_PIECES,
          min_piece: int = MIN_TAPERED_PIECE) -> list[Bucket]:
    """The plan with its last round (the last `workers` buckets, at most half of them) each cut
    into `pieces` contiguous buckets of at least `min_piece` bytes, so that the workers finish
    together.

    Why: when a dozen TCP flows share a link, each one's rate settles at its share, and a flow
    left alone at the end does not speed up in time (BBR probes for more bandwidth by a quarter
    every eight round trips): on 100 Mbit/s the last round of full buckets took a second at a
    twelfth of the link. With small last buckets, every flow stays busy until shortly before the
    end. A piece keeps the plan's rule that only a bucket's first chunk starts inside an
    instance and only its last stops inside one, so its pull URI is as valid and shorter.
    """
    tail = min(max(0, workers), len(buckets) // 2)
    if tail == 0 or pieces <= 1:
        return list(buckets)
    head = list(buckets[: len(buckets) - tail])
    for bucket in buckets[len(buckets) - tail:]:
        head.extend(_cut(bucket, pieces, min_piece))
    return head


def _cut(bucket: Bucket, pieces: int, min_piece: int) -> list[Bucket]:
    """`bucket` as up to `pieces` contiguous buckets of about equal size (none below
    `min_piece`)."""
    total = sum(chunk.size for chunk in bucket)
    pieces = max(1, min(pieces, total // max(1, min_piece)))
    if pieces == 1:
        return [bucket]
    bounds = [total * (i + 1) // pieces for i in range(pieces)]
    out: list[Bucket] = []
    current: list[Chunk] = []
    done = 0  # bytes of the bucket placed in pieces so far
    for chunk in bucket:
        offset, left = chunk.offset, chunk.size
        while left:
            take = min(left, bounds[len(out)] - done)
            current.append(Chunk(chunk.instance_id, offset, take))
            offset, left, done = offset + take, left - take, done + take
            if done == bounds[len(out)]:
                out.append(tuple(current))
                current = []
    return out


def bucket_count_bound(instances: Instances, bucket_size: int) -> int:
    """An upper bound of the length of either plan, known without making it: a few huge
    instances at a small bucket size would otherwise plan millions of buckets before anything
    could refuse them (each instance: ceil(n / 2T) buckets if split, else at most one)."""
    if bucket_size <= 0:
        raise ValueError("the bucket size must be positive")
    separate_threshold = 2 * bucket_size
    return sum(max(1, -(-size // separate_threshold)) for _, size in _sorted_sizes(instances))


def plan_push_buckets(instances: Instances, bucket_size: int) -> list[Bucket]:
    """Push plan: groups are limited by size only (the plan travels in a JSON body)."""
    return _plan(_sorted_sizes(instances), bucket_size, url_budget=None)


def plan_pull_buckets(instances: Instances, bucket_size: int, base_url: str, compression: str) -> list[Bucket]:
    """Pull plan: groups also close once the GET URL reaches 1956 characters.

    `base_url` is the peer URL as normalised by Orthanc (ending with `/`); the length is measured
    on the raw concatenation with the URI, so the doubled slash counts, as in the plugin.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}")
    return _plan(_sorted_sizes(instances), bucket_size, url_budget=(base_url, compression))


def plan_buckets(
    instances: Instances, bucket_size: int, *, base_url: str | None = None, compression: str = "none"
) -> list[Bucket]:
    """Pull plan when `base_url` is given, push plan otherwise."""
    if base_url is None:
        return plan_push_buckets(instances, bucket_size)
    return plan_pull_buckets(instances, bucket_size, base_url, compression)


def _plan(sizes: list[tuple[str, int]], group_threshold: int, url_budget: tuple[str, str] | None) -> list[Bucket]:
    if group_threshold <= 0:
        raise ValueError("the bucket size must be positive")
    separate_threshold = 2 * group_threshold
    buckets: list[Bucket] = []
    small: list[tuple[str, int]] = []
    for instance_id, size in sizes:
        if size < group_threshold:
            small.append((instance_id, size))
        elif size < separate_threshold:
            buckets.append((Chunk(instance_id, 0, size),))
        else:
            buckets.extend(_split(instance_id, size, separate_threshold))
    buckets.extend(_group(small, group_threshold, url_budget))
    return buckets


def _split(instance_id: str, size: int, separate_threshold: int) -> list[Bucket]:
    count = -(-size // separate_threshold)
    piece = size // count
    pieces = [(Chunk(instance_id, i * piece, piece),) for i in range(count - 1)]
    last_offset = (count - 1) * piece
    pieces.append((Chunk(instance_id, last_offset, size - last_offset),))
    return pieces


def _group(small: list[tuple[str, int]], group_threshold: int, url_budget: tuple[str, str] | None) -> list[Bucket]:
    groups: list[Bucket] = []
    current: list[Chunk] = []
    total = 0
    for instance_id, size in small:
        if size == 0:
            continue  # the plugin drops empty chunks; an empty group has no URI to measure
        current.append(Chunk(instance_id, 0, size))
        total += size
        full = total >= group_threshold
        if not full and url_budget is not None:
            base_url, compression = url_budget
            full = len(base_url + chunk_uri(current, compression)) >= MAX_PULL_URL_LENGTH
        if full:
            groups.append(tuple(current))
            current, total = [], 0
    if current:
        groups.append(tuple(current))
    return groups


def _sorted_sizes(instances: Instances) -> list[tuple[str, int]]:
    """(id, size) pairs in ascending ID order (Python's str order is the byte order of UTF-8)."""
    items: Iterable = instances.items() if isinstance(instances, Mapping) else instances
    sizes: dict[str, int] = {}
    for item in items:
        instance_id, size = (item.id, item.size) if isinstance(item, InstanceInfo) else item
        if instance_id in sizes:
            raise ValueError(f"instance listed twice: {instance_id}")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad size for instance {instance_id}: {size!r}")
        sizes[instance_id] = size
    return sorted(sizes.items())
