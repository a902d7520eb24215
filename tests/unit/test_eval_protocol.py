"""Evaluation at step t as MiB and PLOP evaluate: which eval images a step is scored on
(data.eval_filter), what unseen classes become in the eval labels (data.eval_unseen), and
ADE20K's id 0 with data.ignore_background (background in training, ignored at test)."""

import numpy as np
import pytest

from icd_dist.config import ConfigError, load_config
from icd_dist.css import apply_lut, eval_lut, get_dataset, get_task, train_lut
from icd_dist.css.selection import eval_selection_mask, presence_matrix
from icd_dist.data.inspect import eval_selected_keys
from icd_dist.data.manifest import Manifest, SampleRecord, save_manifest

TASK = get_task("voc", "15-1")  # step 0 = 0..15, step 1 = 16, step 2 = 17, step 3 = 18, ...


def mib_filter_images(class_sets, task, step):
    """MiB's dataset/utils.py `filter_images` as its run.py `get_dataset` calls it for the
    test set at `step`: labels = every seen class (0 removed), no old labels, overlap=True:
    keep an image if any id in it is in labels."""
    labels = [c for c in task.seen_classes(step) if c != 0]
    return [i for i, cls in enumerate(class_sets) if any(x in labels for x in cls)]


def mask_of(class_sets, step, task=TASK):
    return eval_selection_mask(presence_matrix(class_sets, task.spec.num_classes), task, step)


def test_background_only_image_is_dropped_at_every_step():
    for step in range(TASK.num_steps):
        assert mask_of([[0], [0, 255], [255]], step).tolist() == [False, False, False]


def test_image_with_only_a_future_class_is_dropped():
    # 18 is learned at step 3: before that the image shows nothing seen but background
    for step in range(3):
        assert not mask_of([[0, 18, 255]], step)[0]
    assert mask_of([[0, 18, 255]], 3)[0]
    assert not mask_of([[19, 20]], 0)[0]


def test_image_with_an_old_class_is_kept():
    # class 3 is learned at step 0: an image of it is scored at every later step, even
    # with a future class beside it, and even though no current class is in it
    for step in range(TASK.num_steps):
        assert mask_of([[0, 3]], step)[0]
        assert mask_of([[0, 3, 20, 255]], step)[0]
    assert mask_of([[16]], 2)[0]  # a class of step 1, at step 2


def test_same_images_as_mibs_filter_images():
    rng = np.random.default_rng(0)
    class_sets = [sorted(set(rng.integers(0, 21, size=rng.integers(1, 4)).tolist())
                         | ({255} if rng.random() < 0.3 else set())) for _ in range(300)]
    presence = presence_matrix(class_sets, 21)
    for task in (TASK, get_task("voc", "15-1", "disjoint"), get_task("voc", [[0, 7, 9], [2]])):
        for step in range(task.num_steps):
            got = np.flatnonzero(eval_selection_mask(presence, task, step)).tolist()
            assert got == mib_filter_images(class_sets, task, step)


def manifest(class_sets, dataset="voc"):
    names = list(get_dataset(dataset).class_names)
    samples = [SampleRecord(f"k{i}", "shard-0.tar", (0, 1), (0, 1), 8, 8, tuple(cs))
               for i, cs in enumerate(class_sets)]
    return Manifest(dataset, "val", names, samples, [])


CLASS_SETS = [
    [0],            # k0: background only
    [0, 255],       # k1: background and void
    [0, 3],         # k2: an old class
    [0, 18, 255],   # k3: a class of step 3
    [17],           # k4: a class of step 2
]


def test_eval_keys_per_step_and_eval_filter_false_keeps_all():
    m = manifest(CLASS_SETS)
    assert eval_selected_keys(m, TASK, 0) == ["k2"]
    assert eval_selected_keys(m, TASK, 2) == ["k2", "k4"]
    assert eval_selected_keys(m, TASK, 3) == ["k2", "k3", "k4"]
    for step in (0, 3):
        assert eval_selected_keys(m, TASK, step, filtered=False) == [f"k{i}" for i in range(5)]


def test_config_options_and_defaults():
    cfg = load_config()
    assert cfg.data.eval_filter is True and cfg.data.eval_unseen == "background"
    cfg = load_config(None, ["data.eval_filter=false", "data.eval_unseen=ignore"])
    assert cfg.data.eval_filter is False and cfg.data.eval_unseen == "ignore"
    with pytest.raises(ConfigError, match="data.eval_unseen"):
        load_config(None, ["data.eval_unseen=void"])


# VOC 15-1 at step 2: seen = 0..17; 18 and 20 unseen
LABELS = np.array([[0, 1, 15, 255],
                   [16, 17, 20, 255],
                   [3, 16, 0, 18]], dtype=np.uint8)


def test_eval_unseen_background_and_ignore():
    background = [[0, 1, 15, 255], [16, 17, 0, 255], [3, 16, 0, 0]]
    ignore = [[0, 1, 15, 255], [16, 17, 255, 255], [3, 16, 0, 255]]
    assert apply_lut(eval_lut(TASK, 2), LABELS).tolist() == background
    assert apply_lut(eval_lut(TASK, 2, False), LABELS).tolist() == background  # positional
    assert apply_lut(eval_lut(TASK, 2, unseen="background"), LABELS).tolist() == background
    assert apply_lut(eval_lut(TASK, 2, False, "ignore"), LABELS).tolist() == ignore
    assert apply_lut(eval_lut(TASK, 2, unseen="ignore"), LABELS).tolist() == ignore
    # everything seen: nothing to hide either way
    assert apply_lut(eval_lut(TASK, 5, unseen="ignore"), LABELS).tolist() == LABELS.tolist()
    with pytest.raises(ValueError, match="unseen"):
        eval_lut(TASK, 2, unseen="void")


def test_eval_unseen_with_an_explicit_class_order():
    task = get_task("voc", [[0, 7, 9], [2]])
    labels = np.array([[0, 7, 9, 2, 4, 255]], dtype=np.uint8)
    assert apply_lut(eval_lut(task, 0, unseen="ignore"), labels).tolist() == \
        [[0, 1, 2, 255, 255, 255]]
    assert apply_lut(eval_lut(task, 1, unseen="ignore"), labels).tolist() == \
        [[0, 1, 2, 3, 255, 255]]


def test_ignore_background_is_background_in_training_and_ignored_at_test():
    task = get_task("ade20k", "100-50")
    labels = np.array([[0, 5, 120, 255]], dtype=np.uint8)
    # training (MiB's dataset/ade.py, train=True): id 0 stays background 0
    assert apply_lut(train_lut(task, 1, ignore_background=True), labels).tolist() == \
        [[0, 0, 120, 255]]
    assert apply_lut(train_lut(task, 0, True), labels).tolist() == [[0, 5, 0, 255]]
    # test (train=False): id 0 -> 255; unseen 120 -> 0 or 255 as data.eval_unseen says
    assert apply_lut(eval_lut(task, 0, ignore_background=True), labels).tolist() == \
        [[255, 5, 0, 255]]
    assert apply_lut(eval_lut(task, 0, True, "ignore"), labels).tolist() == \
        [[255, 5, 255, 255]]
    assert apply_lut(eval_lut(task, 1, True), labels).tolist() == [[255, 5, 120, 255]]


def test_schedule_gives_each_step_its_filtered_eval_keys(tmp_path, monkeypatch):
    """run_schedule without Ray (the step's trainer replaced by a stub): every step's job
    carries the eval keys of eval_selected_keys, and data.eval_filter=false all of them."""
    import ray

    from icd_dist.train import schedule

    names = ["background", "class_1", "class_2", "class_3"]
    train = [[0, 1], [0, 1, 2], [0, 2], [0, 3], [3, 255]]
    evals = [[0], [0, 255], [0, 1], [0, 2], [3, 255]]
    for split, sets in (("train", train), ("val", evals)):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        samples = [SampleRecord(f"{split}{i}", "s.tar", (0, 1), (0, 1), 8, 8, tuple(cs))
                   for i, cs in enumerate(sets)]
        save_manifest(Manifest("synthetic", split, names, samples, []), folder)

    jobs = []

    def fake_fit_plan(plan, run, cfg, gpu):
        for job in plan.jobs:
            jobs.append(job)
            run.save_model(job.step, {"state_dict": {}})
            run.write_metrics(job.step, {
                "step": job.step, "classes": list(job.task.classes_at(job.step)),
                "train_images": len(job.train_keys), "eval_images": len(job.eval_keys),
                "miou_old": None, "miou_new": None, "miou_all": None, "hiou": None,
                "seconds": 0.0, "per_class_iou": {"background": None}})
            run.mark_done(job.step)

    def no_ray(*args, **kwargs):
        pytest.fail("Ray must not start in this test")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(schedule, "init_ray", lambda cfg: False)
    monkeypatch.setattr(schedule, "use_gpu", lambda cfg: False)
    monkeypatch.setattr(schedule, "make_board", lambda: None)
    monkeypatch.setattr(schedule, "fit_plan", fake_fit_plan)
    base = ["data.dataset=synthetic", "data.synthetic.classes=4",
            f"data.train_shards={tmp_path}/data/train", f"data.eval_shards={tmp_path}/data/val",
            f"run.storage_path={tmp_path}/runs", "task.steps=[[0,1],[2],[3]]",
            "method.name=ft", "engine.num_workers=1", "optim.batch_size=8"]
    summary = schedule.run_schedule(load_config(None, [*base, "run.name=filtered"]),
                                    log=lambda m: None)
    assert [j.eval_keys for j in jobs] == [["val2"], ["val2", "val3"], ["val2", "val3", "val4"]]
    assert [s["eval_images"] for s in summary["steps"]] == [1, 2, 3]
    jobs.clear()
    schedule.run_schedule(load_config(None, [*base, "run.name=all", "data.eval_filter=false"]),
                          log=lambda m: None)
    assert [j.eval_keys for j in jobs] == [[f"val{i}" for i in range(5)]] * 3
