"""The follower watchdog: a death it did not cause is reported once, one this process causes never."""

from __future__ import annotations

import threading
import time

from dist_utils import idle_follower

from easyspec.parallel.launch import POLL_S, Followers


def _watched(world: int) -> tuple[Followers, list[str], threading.Event]:
    followers = Followers(idle_follower, world, ())
    reports: list[str] = []
    reported = threading.Event()

    def on_failure(message: str) -> None:
        reports.append(message)
        reported.set()

    followers.watch(on_failure)
    return followers, reports, reported


def test_a_follower_that_dies_is_reported_by_rank():
    followers, reports, reported = _watched(3)
    try:
        followers.procs[1].kill()
        assert reported.wait(10 * POLL_S + 5)
        time.sleep(3 * POLL_S)
        assert len(reports) == 1 and reports[0].startswith("worker rank 2 failed: "), reports
    finally:
        followers.kill()


def test_followers_this_process_kills_or_stops_are_not_failures():
    """The engine kills its followers after it named a stopped one itself; the watchdog reporting that
    kill as "worker rank 1 failed" once won the race and replaced the engine's message."""
    for end in (Followers.kill, Followers.stop):
        followers, reports, reported = _watched(2)
        end(followers)
        assert not any(proc.is_alive() for proc in followers.procs)
        assert not reported.wait(3 * POLL_S), reports
