"""Give freed memory back to the operating system after a big streamed build.

Streaming builds (``student.teacher_lookup``) allocate and free many mid-sized buffers. Arrow's
allocator keeps freed pages for reuse, and glibc malloc keeps freed heap pages below its mmap
threshold, so a process that built a 170 MB result can stay ~150 MB above it for no use.
"""

from __future__ import annotations

import ctypes
import logging

import pyarrow as pa

log = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Return the free pages of Arrow's pool and of glibc's heap (a no-op elsewhere)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only
    except (OSError, AttributeError):
        log.debug("no malloc_trim here (not glibc); freed heap pages stay with the process")
