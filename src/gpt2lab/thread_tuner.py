"""Choose a repeated parallel step's thread count from its own timings, while it runs.

A decode step's threads meet dozens of times a token. On a quiet machine two threads on two cores beat one; when
another program takes a core, the thread that loses its core holds its partner at every meeting, and two threads
decode up to several times slower than one (docs/benchmarks.md, threads under load). `gpt2lab.cpu.decode_threads`
looks at the machine's load once, before a run; load that starts or stops during a long generation or a server's
life needs a choice that follows it. `ThreadTuner` makes that choice from the only measure that matters, the step's
own time:

- it runs the step with the most threads allowed and keeps the last few step times;
- it *probes*: a few steps with the next count on a ladder of halves (8 -> 4 -> 2 -> 1), below or above, and moves
  there if the probe's median time beats the current one's by `gain`;
- it probes where a probe may pay: given a measure of other programs' load (gpt2lab.cpu.LoadMeter, from
  /proc/stat), fewer threads only while other programs keep a CPU busy, more only when the CPUs they would need are
  free, and at once when the load changes; so a quiet machine, or one whose load stays, spends no step on probes.
  Without that measure it probes now and then, waiting twice as long after each probe that did not pay (up to
  `max_gap` steps);
- either way, where fewer threads may pay, it probes them at once when steps become `slowdown` times slower than the
  best seen.

Step times depend on the batch size, so the caller passes a key (the batch size) and times under different keys are
never compared. The tuner is pure bookkeeping (no clock, no threads), so tests drive it with made-up timings.
"""

from __future__ import annotations

from collections import deque
from statistics import median
from typing import Hashable, Optional


def thread_ladder(most: int) -> list[int]:
    """The thread counts a tuner moves between: `most`, then halves down to 1.

    >>> thread_ladder(1), thread_ladder(2), thread_ladder(6), thread_ladder(16)
    ([1], [2, 1], [6, 3, 1], [16, 8, 4, 2, 1])
    """
    ladder = [max(1, most)]
    while ladder[-1] > 1:
        ladder.append(ladder[-1] // 2)
    return ladder


class ThreadTuner:
    """`threads()` says how many threads the next step should use; `record(seconds, key)` reports how long it took.

    window: step times per median (a probe runs one more step and drops the first, which pays for waking the
    threads). first_probe: steps before the first probe (soon: a program that starts on a loaded machine should not
    crawl for long). gap: steps before the next probe, doubled after each probe that did not pay, up to max_gap.
    gain: a probe wins when its median time is below `gain` times the current one's. slowdown: the current median
    over the best seen under the same key that starts a downward probe at once. load_known: the caller passes
    `others` (other programs' busy CPUs) to `record`; then probes go only where that load says they may pay (see
    `_worth_probing`): a quiet machine is never probed, nor a loaded one whose load stays, and a change of load is
    probed at once. cpus: the CPUs this process may run on (default `most`). busy: how far other programs must
    overfill the CPUs before fewer threads are tried (with a 0.25 CPU band below it, so a load that hovers at the
    line does not start a probe at every reading).
    """

    def __init__(self, most: int, *, load_known: bool = False, cpus: Optional[int] = None, window: int = 3,
                 first_probe: int = 3, gap: int = 32, max_gap: int = 256, gain: float = 0.9, slowdown: float = 1.3,
                 busy: float = 0.5) -> None:
        self.most = most
        self.ladder = thread_ladder(most)
        self.cpus = max(1, cpus if cpus is not None else most)
        self.load_known, self.busy = load_known, busy
        self.window, self.gap, self.max_gap = window, gap, max_gap
        self.gain, self.slowdown = gain, slowdown
        self.level = 0  # index into the ladder of the count in use
        self.probes = self.switches = 0  # how many probes ran and how many moved the count (for tests and `info`)
        self._key: Optional[Hashable] = None
        self._recent: dict[Hashable, deque[float]] = {}  # key -> the current count's last step times under it
        self._best: dict[Hashable, dict[int, float]] = {}  # key -> level -> best median seen under it
        self._gap = first_probe  # steps between probes
        self._since = 0  # steps at the current count since the last probe
        self._probe: Optional[int] = None  # the level being probed
        self._direction = 1  # where the next periodic probe looks: +1 fewer threads, -1 more
        self._probe_times: list[float] = []
        self._open = (False, False)  # whether a probe down / up could pay at the last step

    def threads(self) -> int:
        """The thread count for the next step."""
        return self.ladder[self.level if self._probe is None else self._probe]

    def record(self, seconds: float, key: Hashable = None, others: Optional[float] = None) -> None:
        """Report the time of the step that ran with `threads()` threads; `key` names what else sets its time
        (times are compared only under one key: a server's batch size changes as rows come and go); `others` is how
        many CPUs other programs keep busy (gpt2lab.cpu.LoadMeter), None while unknown."""
        if key != self._key:
            self._key, self._probe = key, None  # a probe under another key compares nothing
        recent = self._recent.setdefault(key, deque(maxlen=self.window))
        best_of = self._best.setdefault(key, {})
        if self._probe is not None:
            self._probe_times.append(seconds)
            if len(self._probe_times) > self.window:
                self._finish_probe(recent, best_of)
            return
        recent.append(seconds)
        self._since += 1
        if len(recent) < self.window:
            return
        now = median(recent)
        best = best_of[self.level] = min(best_of.get(self.level, now), now)
        down, up = self._worth_probing(others)
        if (down and not self._open[0]) or (up and not self._open[1]):
            self._gap = self.window  # the load changed so that a probe may pay now: look soon
        self._open = (down, up)
        if down and now > self.slowdown * best:
            self._start_probe(self.level + 1)
        elif self._since >= self._gap and (down or up):
            self._start_probe(self.level + (1 if down and (self._direction > 0 or not up) else -1))

    def _worth_probing(self, others: Optional[float]) -> tuple[bool, bool]:
        """Whether fewer (down) and more (up) threads could pay now. Without a load measure (`load_known` False),
        wherever the ladder goes; with one, fewer only while other programs and our threads together overfill the
        CPUs by `busy`, and more only where the CPUs the added threads need are free. A direction open at the last
        step stays open until the load moves 0.25 CPU back past its line."""
        down = self.level + 1 < len(self.ladder)
        up = self.level > 0
        if not self.load_known:
            return down, up
        if others is None:  # no reading yet
            return False, False
        threads = self.ladder[self.level]
        band_down = 0.25 if self._open[0] else 0.0
        band_up = 0.25 if self._open[1] else 0.0
        down = down and others + threads >= self.cpus + self.busy - band_down
        up = up and others + self.ladder[self.level - 1] < self.cpus + self.busy + band_up
        return down, up

    def _start_probe(self, level: int) -> None:
        self._probe, self._probe_times = level, []
        self.probes += 1

    def _finish_probe(self, recent: deque[float], best_of: dict[int, float]) -> None:
        probed = self._probe_times[1:]  # the first step after a change of count pays for it
        level, self._probe = self._probe, None
        self._since = 0
        self._direction = level - self.level  # a winning direction is tried again, a losing one turned round
        if median(probed) < self.gain * median(recent):
            self.level = level
            self.switches += 1
            recent.clear()
            recent.extend(probed)
            best_of[level] = min(best_of.get(level, median(probed)), median(probed))
            self._gap = self.gap
        else:  # stay; today's time is the baseline a further slowdown is measured against
            self._direction = -self._direction
            best_of[self.level] = median(recent)
            self._gap = min(max(2 * self._gap, self.gap), self.max_gap)
