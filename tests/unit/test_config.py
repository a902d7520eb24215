"""Config composition, overrides and every kind of error."""

import textwrap

import pytest

from icd_dist.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
    update,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def layered(tmp_path):
    write(tmp_path / "base.yaml", """
        run: {seed: 1, storage_path: /tmp/runs}
        optim: {lr: 0.01, batch_size: 24, epochs: 30}
        loss: {icd: {lambda_int: 1.0, tau: 1.0}}
    """)
    write(tmp_path / "datasets/voc.yaml", """
        data: {dataset: voc, crop_size: 512}
    """)
    write(tmp_path / "methods/icd.yaml", """
        method: {name: icd}
        loss: {icd: {lambda_ext: 100.0, stats: [mean, std]}}
    """)
    return write(tmp_path / "exp/voc_15-1_icd.yaml", """
        bases: [../base.yaml, ../datasets/voc.yaml, ../methods/icd.yaml]
        task: {name: 15-1, setting: disjoint}
        optim: {epochs: 10}
    """)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optim.lr == 0.01 and cfg.optim.batch_size == 24
    assert cfg.loss.icd.stats == ("mean", "std", "max", "spatial_mean", "spatial_std")


def test_composition_merges_mappings_and_later_files_win(layered):
    cfg = load_config(layered)
    assert cfg.run.seed == 1 and cfg.run.storage_path == "/tmp/runs"
    assert cfg.data.dataset == "voc"
    assert cfg.task.name == "15-1" and cfg.task.setting == "disjoint"
    assert cfg.optim.epochs == 10 and cfg.optim.lr == 0.01  # file overrides one key of base
    assert cfg.loss.icd.lambda_int == 1.0 and cfg.loss.icd.lambda_ext == 100.0
    assert cfg.loss.icd.stats == ("mean", "std")  # lists replace


def test_overrides_apply_in_order_with_yaml_values(layered):
    cfg = load_config(layered, [
        "optim.lr=0.02", "optim.lr=0.03", "loss.icd.stats=[max]", "run.name=my-run",
        "task.steps=[[0,1],[2]]", "model.pretrained=null", "optim.weight_decay=5e-4",
        "logging.wandb=disabled",
    ])
    assert cfg.optim.lr == 0.03
    assert cfg.loss.icd.stats == ("max",)
    assert cfg.run.name == "my-run"
    assert cfg.task.steps == ((0, 1), (2,))
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.logging.wandb == "disabled"


def test_ints_are_accepted_for_floats_and_exponent_strings_parse():
    cfg = config_from_dict({"optim": {"lr": 1, "weight_decay": "1e-4"}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


def test_resolved_config_round_trips(tmp_path, layered):
    cfg = load_config(layered, ["task.steps=[[0,1],[2]]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert "lambda_ext: 100.0" in dump_config(cfg)


def test_unknown_key_names_it_allowed_keys_and_suggestion(layered):
    with pytest.raises(ConfigError) as err:
        load_config(layered, ["optim.lrr=0.1"])
    msg = str(err.value)
    assert err.value.key == "optim.lrr"
    assert "allowed keys at 'optim'" in msg and "batch_size" in msg
    assert "did you mean 'optim.lr'" in msg
    assert "override 'optim.lrr=0.1'" in msg


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "data: {datset: voc}\n")
    with pytest.raises(ConfigError, match=r"data\.datset: unknown key.*bad\.yaml"):
        load_config(path)
    path = write(tmp_path / "bad2.yaml", "trainer: {x: 1}\n")
    with pytest.raises(ConfigError, match="allowed keys at the top level: run, data"):
        load_config(path)


@pytest.mark.parametrize(("override", "key", "fragment"), [
    ("optim.lr=fast", "optim.lr", "expected a number, got 'fast'"),
    ("optim.batch_size=2.5", "optim.batch_size", "expected an integer"),
    ("optim.nesterov=1", "optim.nesterov", "expected true or false"),
    ("engine.engine=horovod", "engine.engine", "one of 'deepspeed', 'ddp'"),
    ("model.output_stride=32", "model.output_stride", "one of 8, 16"),
    ("loss.icd.stats=[mean, median]", "loss.icd.stats", "'spatial_std'"),
    ("task.steps=[[0,1],2]", "task.steps", "expected a list of lists of integers or null"),
    ("optim.lr=-1", "optim.lr", "must be a positive number"),
    ("optim.momentum=1.5", "optim.momentum", "must be a number in [0, 1)"),
    ("loss.icd.msca_kernels=[7,8]", "loss.icd.msca_kernels", "odd positive"),
    ("loss.icd.stats=[mean, mean]", "loss.icd.stats", "distinct"),
    ("data.scale_min=3.0", "data.scale_min", "must be <= data.scale_max"),
    ("engine.launcher=local", "engine.num_workers", "set engine.num_workers=1 (got 2)"),
    ("optim=3", "optim", "expected a mapping"),
])
def test_wrong_types_and_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert fragment in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "a.yaml", "bases: [b.yaml]\n")
    write(tmp_path / "b.yaml", "bases: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "bases: [nope.yaml]\n")
    with pytest.raises(ConfigError, match="base file 'nope.yaml' not found"):
        load_config(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "d.yaml")
    write(tmp_path / "e.yaml", "data: {dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "e.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["optim.lr"])


def test_yaml_cannot_construct_objects(tmp_path):
    path = write(tmp_path / "evil.yaml", "run: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_shipped_experiment_configs_load_and_name_a_task():
    from pathlib import Path

    from icd_dist.css import task_from_config

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(p for p in root.rglob("*.yaml") if "_base" not in p.parts
                   and not p.name.startswith("_"))  # tune/_*.yaml: parts the sweeps share
    assert len(files) >= 3 * 4 + 3, "configs/ lacks the experiment files"
    for path in files:
        cfg = load_config(path)
        task = task_from_config(cfg)
        if path.stem == "joint":
            assert cfg.method.name == "joint" and task.num_steps == 1
        elif path.parent == root:  # demo.yaml and other top-level examples
            assert task.num_steps >= 2
        elif path.parent.name == "tune":  # sweeps: every schedule is a task of the dataset
            assert cfg.method.name == path.stem.split("_")[-1] or path.stem == "demo"
            if path.stem.startswith("demo"):  # the run demo's task, which learns at this size
                assert cfg.tune.schedules == (load_config(root / "demo.yaml").task.name,)
            elif path.stem.startswith("camvid-large"):  # the tuning study: large-2s only
                assert cfg.tune.schedules == ("large-2s",) and cfg.tune.try_config_first
            else:
                assert len(cfg.tune.schedules) >= 2, path
            for schedule in cfg.tune.schedules:
                assert task_from_config(update(cfg, {"task.name": schedule})).num_steps >= 2
        else:
            # <task>_<method>.yaml; <task>_<method>_borrowed.yaml: the authors' VOC values
            # where the shipped file holds the tuning study's
            name, method, *variant = path.stem.split("_")
            assert variant in ([], ["borrowed"]), path
            assert (task.name, cfg.method.name) == (name, method)
            assert cfg.data.dataset == path.parent.name
            if method == "plop":  # PLOP's factors per dataset (its scripts/ and argparser.py)
                factors = {"voc": (0.01, 0.0005), "ade20k": (0.001, 0.00001)}
                if cfg.data.dataset in factors:
                    assert (cfg.loss.pod.lambda_pod, cfg.loss.pod.lambda_pod_logits) == \
                        factors[cfg.data.dataset], path


def test_config_error_survives_pickling():
    import pickle

    err = ConfigError("optim.lr", "must be positive", "override 'optim.lr=-1'")
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.detail, str(back)) == (err.key, err.detail, str(err))


def test_typed_update_sets_values_without_parsing_text():
    cfg = load_config(None, [])
    new = update(cfg, {"run.name": "93760_00000", "loss.icd.stats": ("std", "max"),
                       "engine.num_workers": 4, "optim.lr": 1})
    assert new.run.name == "93760_00000"  # a string stays a string (text would read a number)
    assert new.loss.icd.stats == ("std", "max") and new.engine.num_workers == 4
    assert new.optim.lr == 1.0 and isinstance(new.optim.lr, float)
    assert cfg.run.name != "93760_00000"  # the original is unchanged (frozen)
    for changes, message in [({"run.nme": "x"}, "run.nme: unknown key.*did you mean 'run.name'"),
                             ({"engine.num_workers": "2"}, "engine.num_workers: expected an "
                              "integer"),
                             ({"engine.num_workers": 0}, "engine.num_workers: must be a "
                              "positive integer"),
                             ({"engine.precision": "bf32"}, "engine.precision: expected one of"),
                             ({"run": {"name": "x"}}, "run: is a section"),
                             ({"optim.batch_size": 25}, "optim.batch_size: 25 is not a "
                              "multiple")]:
        with pytest.raises(ConfigError, match=message):
            update(cfg, changes)
