"""Peak resident memory of a server process and its descendants, sampled from /proc while a load
level runs (Linux). Resident pages shared between a parent and its children are counted once per
process, as `ps` shows them: for vLLM-CPU (an API process and an engine-core child) this is an
upper bound of what the pair holds."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in (PROC / str(pid) / "task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` plus every descendant's (0 for a process that is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_bytes(p)
        todo += _children(p)
    return total


@dataclass(slots=True)
class PeakRss:
    """`with PeakRss(pid) as peak: ...` samples every `interval` s; `peak.mib` is the maximum."""
    pid: int
    interval: float = 0.25
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRss":
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
