"""Run one measurement in a process of its own, so that its peak memory is its own."""
from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Callable

import torch


def forked(fn: Callable[..., dict], *args, threads: int) -> dict:
    """fn(*args) in a fork() of this process; its dict result, or {"error": traceback} when it
    raised or died. Fork only from a parent that did no tensor work (and never after CUDA started:
    run in-process there, the caching allocator's peak can be reset per row)."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: measure, send, leave without running the parent's cleanup
        os.close(rfd)
        code = 0
        try:
            torch.set_num_threads(threads)
            out = fn(*args)
        except BaseException:
            out, code = {"error": traceback.format_exc()}, 1
        try:
            with os.fdopen(wfd, "wb") as f:
                pickle.dump(out, f)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return pickle.loads(data)
    died = (f"worker killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
            else f"worker exited with status {os.WEXITSTATUS(status)}")
    return {"error": died + " before sending a result (out of memory?)"}
