"""A sweep's console without a cluster: the trial lines SweepConsole prints from Tune's
callbacks, and its status line, at most every 30 s and only when it says something new."""

from types import SimpleNamespace

import ray.cloudpickle as cloudpickle

from icd_dist.train.progress import ProgressWriter
from icd_dist.train.storage import Storage
from icd_dist.train.sweep_console import SweepConsole, format_step_line

METRICS = {"miou_old": 0.7069, "miou_new": 0.5622, "miou_all": 0.678, "hiou": 0.6263}


def trial(trial_id, status="RUNNING", schedule="3-1", **params):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={},
                           config={"schedule": schedule, **params})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def console(tmp_path, last_steps=None):
    lines, clock = [], Clock()
    trials = Storage(str(tmp_path / "sweep")).child("trials")
    con = SweepConsole(lines.append, trials, last_steps or {"3-1": 1, "2-1": 2}, clock=clock)
    con.setup()
    return con, lines, clock, trials


def test_step_line_names_trial_schedule_step_and_the_four_numbers():
    assert format_step_line("571c1_00000", "3-1", 1, 1, METRICS) == \
        "trial 571c1_00000 3-1 step 1/1: old 70.69 new 56.22 all 67.80 hIoU 62.63"
    assert format_step_line("a_00001", "2-1", 1, 2, {"miou_old": 0.5}) == \
        "trial a_00001 2-1 step 1/2: old 50.00 new - all - hIoU -"


def test_one_line_per_trial_start_step_and_end(tmp_path):
    con, lines, _, trials = console(tmp_path)
    good = trial("t_00000", lambda_int=1.878985, lambda_ext=3.46396)
    short = trial("t_00001", schedule="2-1", lambda_int=0.5, lambda_ext=70.0)
    con.on_trial_start(0, [good], good)
    con.on_trial_result(1, [good], good, {"step": 1, **METRICS})
    con.on_trial_complete(2, [good], good)
    con.on_trial_start(3, [short], short)
    con.on_trial_result(4, [short], short, {"step": 1, **METRICS})
    con.on_trial_complete(5, [short], short)  # ASHA stopped it before step 2 of 2
    con.on_trial_error(6, [short], short)
    assert lines == [
        "trial t_00000 3-1: started with lambda_ext=3.464, lambda_int=1.879",
        "trial t_00000 3-1 step 1/1: old 70.69 new 56.22 all 67.80 hIoU 62.63",
        "trial t_00000 3-1: finished",
        "trial t_00001 2-1: started with lambda_ext=70, lambda_int=0.5",
        "trial t_00001 2-1 step 1/2: old 70.69 new 56.22 all 67.80 hIoU 62.63",
        "trial t_00001 2-1: stopped early by the scheduler after step 1/2",
        f"trial t_00001 2-1: failed (traceback in {trials.child('t_00001').uri('run.log')})",
    ]


def test_status_at_most_every_30s_and_only_when_it_changed(tmp_path):
    con, lines, clock, trials = console(tmp_path)
    running = [trial("t_00000"), trial("t_00001")]
    everyone = [*running, trial("t_00002", status="PENDING"),
                trial("t_00003", status="TERMINATED")]
    progress = ProgressWriter(trials.child("t_00000"), "step_1/progress.log")
    progress.write("step 1 epoch 1/12: seg 0.91, distill 0.12")

    def tick(seconds):
        clock.now += seconds
        con.on_step_end(0, everyone)

    tick(29.0)
    assert lines == []  # not yet 30 s
    tick(1.0)
    assert lines == ["sweep 30s: t_00000 step 1 epoch 1/12, t_00001 step 1; 1 pending, 1 done"]
    progress.write("step 1 epoch 2/12: seg 0.80, distill 0.11")
    tick(10.0)
    assert len(lines) == 1  # new, but 10 s after the last line
    tick(20.0)
    assert lines[-1] == \
        "sweep 1m00s: t_00000 step 1 epoch 2/12, t_00001 step 1; 1 pending, 1 done"
    tick(30.0)
    tick(30.0)
    assert len(lines) == 2  # nothing new to say
    # A trial line counts as a line: the status waits 30 s after it.
    progress.write("step 1 epoch 3/12: seg 0.70, distill 0.10")
    con.on_trial_result(0, everyone, running[1], {"step": 1, **METRICS})
    tick(29.0)
    assert len(lines) == 3
    tick(1.0)
    assert lines[-1] == \
        "sweep 2m30s: t_00000 step 1 epoch 3/12, t_00001 step 1; 1 pending, 1 done"


def test_console_survives_tunes_pickling(tmp_path):
    """Tune pickles the RunConfig's callbacks into the experiment (tuner.pkl)."""
    con = SweepConsole(lambda msg: None, Storage(str(tmp_path)), {"3-1": 1})
    again = cloudpickle.loads(cloudpickle.dumps(con))
    assert again.last_steps == {"3-1": 1}
