"""scripts/test.sh's parallel run: each pytest-xdist worker takes its share of the cores, and the tests that share a
costly module-scoped fixture run in one worker, and slow tests outside such a group start first (tests/conftest.py).
Skipped in a one-process run."""
from __future__ import annotations

import os

import pytest
import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
pytestmark = pytest.mark.skipif(WORKERS < 2, reason="runs under scripts/test.sh's workers")


@pytest.fixture(scope="module")
def shared():
    return object()


def test_a_worker_and_what_it_starts_use_its_share_of_the_cores():
    share = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    assert torch.get_num_threads() == share
    assert os.environ["OMP_NUM_THREADS"] == str(share)  # what the benches, servers and CLI it starts read


def test_tests_sharing_a_module_fixture_are_one_group(request, shared):
    # xdist marks a grouped test's id with its group (pytest 9.2 drops it: pytest-dev/pytest-xdist#1386)
    assert request.node.nodeid.endswith("@" + request.module.__name__), request.node.nodeid


@pytest.mark.slow  # not slow: marked so that the order checked below has a slow test to place, whatever is collected
def test_slow_tests_outside_a_group_are_handed_out_first(request):
    first = [bool(item.get_closest_marker("slow")) and not item.get_closest_marker("xdist_group")
             for item in request.session.items]
    assert first[0] and first == sorted(first, reverse=True), [i.nodeid for i in request.session.items[:5]]
