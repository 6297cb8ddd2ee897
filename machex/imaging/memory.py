"""Let a build worker keep the memory of the images it frees, for the next image.

Each large image passes through buffers of tens of MB: the decoded 16-bit image, its float
copy, DICOM arrays. glibc returns such blocks to the operating system as soon as they are
freed (through ``munmap``, or by trimming the top of the heap), so every image pays
again for mapping fresh pages: thousands of page faults, at about 5 us each on a cloud VM.
Raising glibc's mmap and trim thresholds keeps the freed blocks in the heap, where the next
image reuses them. Measured on one core (``benchmarks/bench_worker_memory.py``): an
uncompressed 2400x3000 DICOM 76 -> 30-35 ms per image, a 2544x3056 JPEG 45-49 -> 36-39 ms,
a 2800x2800 16-bit PNG 162-191 -> 157-158 ms.

The setting belongs to the whole process, so only processes that build images apply it
(``machex.assemble.build_in_worker``), never a library import. Elsewhere than glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap: glibc's ceiling on 64-bit systems, above a
#: 2800x2800 float image (31 MB) and Pillow's 16 MiB allocation blocks.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory the heap may keep at its top: about two large images' worth of buffers.
TRIM_THRESHOLD = 128 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Raise this process's glibc thresholds (once); True where they were set."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (AttributeError, OSError, ValueError):  # not glibc, no confstr name, no symbol
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
