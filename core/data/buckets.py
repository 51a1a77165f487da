"""Aspect-ratio buckets: train each image at a shape close to its own instead of cropping everything square.

Every bucket has about the pixel budget of a square at the training resolution, so a batch of any
bucket costs roughly the same memory, and both sides are multiples of 64 so the VAE's 8× downsampling
and the UNet's three further halvings stay whole. Images of one bucket can share a batch.
"""

from __future__ import annotations

import math
from functools import cache

Bucket = tuple[int, int]

STEP = 64
MAX_ASPECT = 2.0


@cache
def bucket_resolutions(resolution: int) -> tuple[Bucket, ...]:
    """Every (width, height) bucket for a square `resolution`, widest last.

    For each width step the tallest height within resolution² and the 1:2 to 2:1 aspect range is a
    candidate, and its transpose too so portrait and landscape are served alike. Of candidates with the
    same aspect only the largest is kept, since a smaller one would never win a tie.
    """
    largest: dict[float, Bucket] = {}
    for width in range(STEP, int(resolution * MAX_ASPECT) + 1, STEP):
        height = min(resolution * resolution // width, int(width * MAX_ASPECT)) // STEP * STEP
        if height < STEP or width > height * MAX_ASPECT:
            continue
        for bucket in ((width, height), (height, width)):
            aspect = bucket[0] / bucket[1]
            if aspect not in largest or _area(bucket) > _area(largest[aspect]):
                largest[aspect] = bucket
    return tuple(bucket for _, bucket in sorted(largest.items()))


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket closest in log aspect ratio, so 2:1 and 1:2 are equally far from square; ties go to the larger."""
    target = math.log(width / height)
    return min(buckets, key=lambda bucket: (round(abs(math.log(bucket[0] / bucket[1]) - target), 9), -_area(bucket)))


def assign_bucket(width: int, height: int, resolution: int, *, bucketing: bool = True) -> Bucket:
    """The training shape of a `width`×`height` image; with bucketing off every image is cropped square."""
    if not bucketing:
        return resolution, resolution
    return nearest_bucket(width, height, bucket_resolutions(resolution))


def _area(bucket: Bucket) -> int:
    return bucket[0] * bucket[1]
