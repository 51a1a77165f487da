"""Run test work under limits the OS would enforce for a user: file modes even as root, and a deadline.

Shared by the dataset tests and the reliability suite, so that "unreadable" means the kernel refused,
and a load that would block on a named pipe fails the test instead of hanging the run.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

T = TypeVar("T")
_CAPABILITY_VERSION_3 = 0x20080522
_DAC_CAPABILITIES = 1 << 1 | 1 << 2
"""CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: what lets root ignore a file's mode bits."""


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySet(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_dac_capabilities() -> None:
    """Take root's power to ignore mode bits away from the calling thread, for good (capget/capset(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = _CapabilityHeader(_CAPABILITY_VERSION_3, 0), (_CapabilitySet * 2)()
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    sets[0].effective &= ~_DAC_CAPABILITIES
    sets[0].permitted &= ~_DAC_CAPABILITIES
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def as_ordinary_user(work: Callable[[], T]) -> T:
    """`work()`, with file modes enforced on it as they are for any user, even when the tests run as root.

    CI runs as root, which writes into a 0o555 folder regardless; without this, the read-only folder tests
    would prove nothing there. Switching to uid 65534 is not an option: the interpreter (under /root) and
    pytest's tmp_path sit in root-only 0o700 folders. So as root `work` runs on a thread of its own that
    drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: Linux keeps capabilities per thread, so the rest of the
    test process keeps them, the kernel refuses the writes for real, and threads `work` starts inherit the
    drop. Root still owns those folders, so their owner bits let it read them.
    """
    if os.geteuid() != 0:
        return work()

    def unprivileged() -> T:
        _drop_dac_capabilities()
        return work()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ordinary-user") as pool:
        return pool.submit(unprivileged).result()


def within(seconds: float, work: Callable[[], T]) -> T:
    """`work()`, or a test failure if it has not returned after `seconds`.

    It runs on a daemon thread: a thread blocked in `open` on a named pipe cannot be interrupted, so a
    hang is reported and the thread is left behind rather than stopping the whole test run.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # handed to the test's thread below
            failure.append(error)

    thread = threading.Thread(target=run, name="deadline", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds:g} s: it blocks (on a named pipe or device?)")
    if failure:
        raise failure[0]
    return outcome[0]
