"""The task registry against the protocol's tables (DESIGN.md, MiB/PLOP task definitions)."""

import pytest

from icd_dist.config import ConfigError, load_config
from icd_dist.css import get_task, known_tasks, task_from_config


def r(a, b):
    return list(range(a, b + 1))


EXPECTED = {
    ("voc", "19-1"): [r(0, 19), [20]],
    ("voc", "15-5"): [r(0, 15), r(16, 20)],
    ("voc", "15-1"): [r(0, 15), [16], [17], [18], [19], [20]],
    ("voc", "10-1"): [r(0, 10)] + [[c] for c in range(11, 21)],
    ("voc", "5-3"): [r(0, 5), r(6, 8), r(9, 11), r(12, 14), r(15, 17), r(18, 20)],
    ("ade20k", "100-50"): [r(0, 100), r(101, 150)],
    ("ade20k", "100-10"): [r(0, 100)] + [r(s, s + 9) for s in range(101, 151, 10)],
    ("ade20k", "100-5"): [r(0, 100)] + [r(s, s + 4) for s in range(101, 151, 5)],
    ("ade20k", "50-50"): [r(0, 50), r(51, 100), r(101, 150)],
    ("camvid", "6-5"): [r(0, 6), r(7, 11)],
    ("camvid", "6-1"): [r(0, 6), [7], [8], [9], [10], [11]],
    ("voc", "offline"): [r(0, 20)],
    ("ade20k", "offline"): [r(0, 150)],
}


@pytest.mark.parametrize(("dataset", "name"), sorted(EXPECTED))
def test_registered_task_steps(dataset, name):
    task = get_task(dataset, name)
    assert [list(s) for s in task.steps] == EXPECTED[(dataset, name)]


def test_step_counts_and_class_sets():
    assert get_task("voc", "15-1").num_steps == 6
    assert get_task("voc", "10-1").num_steps == 11
    assert get_task("ade20k", "100-5").num_steps == 11
    assert get_task("ade20k", "100-10").num_steps == 6
    task = get_task("voc", "15-1")
    assert task.seen_classes(2) == tuple(range(18))
    assert task.old_classes(2) == tuple(range(17))
    assert task.old_classes(0) == ()
    assert task.num_seen(5) == 21
    assert task.class_name(15) == "person" and task.class_name(20) == "tvmonitor"
    with pytest.raises(IndexError, match="steps 0..5"):
        task.classes_at(6)


def test_ade_and_camvid_names():
    ade = get_task("ade20k", "100-50")
    assert ade.spec.num_classes == 151
    assert ade.class_name(1) == "wall" and ade.class_name(150) == "flag"
    assert ade.class_name(100) == "buffet" and ade.class_name(101) == "poster"
    cam = get_task("camvid", "6-5")
    assert [cam.class_name(c) for c in cam.classes_at(1)] == [
        "signsymbol", "fence", "car", "pedestrian", "bicyclist"]


def test_to_dict_format():
    d = get_task("voc", "19-1", "disjoint").to_dict()
    assert d == {"dataset": "voc", "task": "19-1", "setting": "disjoint",
                 "steps": [{"step": 0, "classes": r(0, 19)}, {"step": 1, "classes": [20]}]}


def test_explicit_task_any_order_maps_to_logit_indices():
    task = get_task("voc", [[0, 5, 3], [1], [20, 2]])
    assert task.steps == ((0, 3, 5), (1,), (2, 20))
    assert task.class_order == (0, 3, 5, 1, 2, 20)
    assert task.index_of(5) == 2 and task.index_of(20) == 5
    assert get_task("voc", "[[0, 1], [2]]").steps == ((0, 1), (2,))


@pytest.mark.parametrize(("steps", "message"), [
    ([], "at least one step"),
    ([[1, 2], [3]], "background class 0"),
    ([[0, 1], []], "step 1 must be a non-empty list"),
    ([[0, 1], [1]], "class 1 is already learned"),
    ([[0, 21]], "class id 21 is not in 0..20"),
    ([[0, "a"]], "class id 'a'"),
])
def test_explicit_task_errors(steps, message):
    with pytest.raises(ConfigError, match=message):
        get_task("voc", steps)


def test_unknown_task_and_dataset_list_known_ones():
    with pytest.raises(ConfigError) as err:
        get_task("voc", "12-1")
    assert err.value.key == "task.name"
    assert "19-1, 15-5, 15-1, 10-1, 5-3, offline" in str(err.value)
    with pytest.raises(ConfigError, match="known datasets: voc, ade20k, camvid"):
        get_task("coco", "15-1")
    with pytest.raises(ConfigError, match="unknown setting"):
        get_task("voc", "15-1", "mixed")
    assert known_tasks("camvid") == ("6-5", "6-1", "offline")


def test_task_from_config_named_and_explicit():
    cfg = load_config(None, ["data.dataset=camvid", "task.name=6-1", "task.setting=disjoint"])
    task = task_from_config(cfg)
    assert task.num_steps == 6 and task.setting == "disjoint"
    cfg = load_config(None, ["data.dataset=voc", "task.name=mine", "task.steps=[[0,1,2],[3,4]]"])
    task = task_from_config(cfg)
    assert task.name == "mine" and task.steps == ((0, 1, 2), (3, 4))
