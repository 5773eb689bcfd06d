"""ThreadTuner, driven by made-up step times: it must follow load as it comes and goes, and cost little when quiet."""

import pytest

from gpt2lab.thread_tuner import ThreadTuner, thread_ladder


def drive(tuner, seconds_for, steps, key=1):
    """Run `steps` steps whose time is seconds_for(threads, step); return the thread counts used."""
    used = []
    for i in range(steps):
        threads = tuner.threads()
        used.append(threads)
        tuner.record(seconds_for(threads, i), key)
    return used


def quiet(threads, step):
    return {2: 0.016, 1: 0.020}[threads]


def loaded(threads, step):
    return {2: 0.050, 1: 0.020}[threads]


def test_ladder_halves_down_to_one():
    assert thread_ladder(2) == [2, 1]
    assert thread_ladder(12) == [12, 6, 3, 1]
    assert thread_ladder(0) == [1]


def test_one_thread_allowed_never_probes():
    tuner = ThreadTuner(1)
    assert drive(tuner, lambda t, i: 0.01, 500) == [1] * 500
    assert tuner.probes == 0


def test_quiet_machine_stays_at_the_most_threads_and_probes_rarely():
    tuner = ThreadTuner(2)
    used = drive(tuner, quiet, 2000)
    assert used[-1] == 2 and tuner.switches == 0
    spent = sum(quiet(t, 0) for t in used)
    assert spent < 1.01 * quiet(2, 0) * len(used)  # probes: a few steps each, ever further apart


def test_load_from_the_start_moves_to_one_thread_within_a_few_dozen_steps():
    tuner = ThreadTuner(2)
    used = drive(tuner, loaded, 400)
    assert 1 in used[:30] and used[30:].count(2) < 0.1 * len(used[30:])


def test_load_arriving_mid_run_is_followed_at_once_and_its_end_too():
    tuner = ThreadTuner(2)
    timing = lambda t, i: loaded(t, i) if 300 <= i < 1300 else quiet(t, i)
    used = drive(tuner, timing, 1700)
    assert used[295:300].count(2) == 5
    first_one = used.index(1, 300)
    assert first_one < 310  # the slowdown starts a probe without waiting for the next periodic one
    assert used[320:1300].count(2) < 0.05 * 980
    # the one-thread time does not show the load going: the next upward probe finds it, max_gap steps at most
    back = used.index(2, 1300)
    assert back <= 1300 + tuner.max_gap + tuner.window and used[-100:].count(2) >= 96


def test_a_slower_step_that_more_threads_still_win_is_kept():
    tuner = ThreadTuner(2)
    timing = lambda t, i: quiet(t, i) * (2.0 if i >= 100 else 1.0)  # e.g. a longer context: both counts slower
    used = drive(tuner, timing, 600)
    assert tuner.switches == 0 and used[-100:].count(2) == 100
    assert used.count(1) < 0.05 * len(used)  # the new time became the baseline: no probe after every window


def test_times_under_another_key_are_not_compared():
    tuner = ThreadTuner(2)
    drive(tuner, quiet, 50, key=1)
    used = drive(tuner, lambda t, i: quiet(t, i) * 8, 50, key=8)  # batch 8 steps are slower, not a slowdown
    assert tuner.switches == 0 and used.count(1) <= tuner.window + 1


def test_more_threads_move_down_the_ladder_one_rung_at_a_time():
    tuner = ThreadTuner(8)
    times = {8: 0.08, 4: 0.04, 2: 0.02, 1: 0.03}
    used = drive(tuner, lambda t, i: times[t], 600)
    assert used[-1] == 2 and set(used) <= {8, 4, 2, 1}


@pytest.mark.parametrize("bad", [{2: 0.016, 1: 0.0176}])  # one thread only 10% slower: not worth a move
def test_a_probe_must_win_by_the_gain(bad):
    tuner = ThreadTuner(2)
    drive(tuner, lambda t, i: bad[t], 500)
    assert tuner.switches == 0


# ------------------------------------------------------------------------------ with a measure of the machine's load
def drive_with_load(tuner, steps, others_at, seconds_for):
    """As `drive`, with other programs' busy CPUs at each step (None: no reading yet)."""
    used = []
    for i in range(steps):
        threads = tuner.threads()
        used.append(threads)
        tuner.record(seconds_for(threads, i), 1, others_at(i))
    return used


def test_a_quiet_machine_with_a_load_measure_is_never_probed():
    tuner = ThreadTuner(2, load_known=True)
    used = drive_with_load(tuner, 3000, lambda i: None if i < 10 else 0.05, quiet)
    assert used == [2] * 3000 and tuner.probes == 0


def test_a_steady_load_is_probed_once_and_then_left_alone():
    tuner = ThreadTuner(2, load_known=True)
    used = drive_with_load(tuner, 3000, lambda i: None if i < 10 else 1.0, loaded)
    assert used[:10] == [2] * 10  # no reading yet: nothing to go on
    assert used.index(1) < 16 and used[20:] == [1] * 2980
    assert tuner.probes == 1 and tuner.switches == 1


def test_the_end_of_the_load_is_probed_at_once():
    tuner = ThreadTuner(2, load_known=True)
    load = lambda i: 1.0 if i < 1000 else 0.0
    timing = lambda t, i: loaded(t, i) if i < 1000 else quiet(t, i)
    used = drive_with_load(tuner, 1500, load, timing)
    assert used[20:1000] == [1] * 980
    assert used.index(2, 1000) <= 1000 + tuner.window and used[1010:] == [2] * 490
    assert tuner.probes == 2


def test_a_load_measure_does_not_stop_a_move_that_does_not_pay():
    tuner = ThreadTuner(2, load_known=True)
    both_slow = lambda t, i: {2: 0.030, 1: 0.040}[t]  # loaded, yet two threads still win (e.g. two busy programs)
    used = drive_with_load(tuner, 2000, lambda i: 1.4, both_slow)
    assert tuner.switches == 0 and used.count(1) < 0.03 * len(used)  # then one probe per max_gap steps


def test_more_threads_are_tried_only_when_their_cpus_are_free():
    tuner = ThreadTuner(8, load_known=True)
    times = {8: 0.08, 4: 0.03, 2: 0.04, 1: 0.07}  # six CPUs busy elsewhere: four threads are best
    used = drive_with_load(tuner, 2000, lambda i: 6.0, lambda t, i: times[t])
    assert used[-1] == 4
    probes_at_four = tuner.probes
    # others keep 6 of 8 CPUs: 8 threads would need 4 more, only 2 free, so no probe upward; downward ones still run
    # (rarely) because the machine is loaded
    used = drive_with_load(tuner, 2000, lambda i: 6.0, lambda t, i: times[t])
    assert 8 not in used and used.count(4) > 0.97 * len(used)
    assert tuner.probes - probes_at_four <= 2000 // tuner.max_gap + 1


def test_a_batch_size_that_changes_every_step_does_not_stop_the_tuner():
    """A server's batch grows and shrinks as requests come and go; times are kept per batch size."""
    tuner = ThreadTuner(2, load_known=True)
    used = []
    for i in range(600):
        threads, batch = tuner.threads(), 1 + i % 3
        used.append(threads)
        tuner.record(loaded(threads, i) * batch, batch, None if i < 5 else 1.0)
    assert used[-100:] == [1] * 100


def test_a_load_hovering_at_the_line_does_not_start_a_probe_at_every_reading():
    tuner = ThreadTuner(2, load_known=True)
    drive_with_load(tuner, 3000, lambda i: 0.45 if (i // 5) % 2 else 0.55, quiet)  # flips every 5 steps
    assert tuner.probes <= 3000 // tuner.gap


def test_a_big_machine_with_a_little_background_load_is_left_alone():
    tuner = ThreadTuner(8, load_known=True, cpus=16)  # 8 threads of 16 CPUs; other programs use 0.6 of one
    used = drive_with_load(tuner, 2000, lambda i: 0.6, lambda t, i: 0.08 / t)
    assert used == [8] * 2000 and tuner.probes == 0
