"""tune.space: a sweep over any config key. The shipped sweep files, the methods' own spaces,
the YAML forms, the errors that name the key (before Ray starts), and how a trial's sampled
values become a typed config."""

from pathlib import Path

import pytest

from icd_dist.config import (
    ConfigError,
    SearchDim,
    check_search_dim,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    update,
)
from icd_dist.methods import METHODS
from icd_dist.train.sweep import _tune_option, search_space, sweep_space, trial_params

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p for p in (ROOT / "configs" / "tune").glob("*.yaml")
                if not p.name.startswith("_"))


def test_every_method_has_a_sweep_file_on_every_dataset():
    names = {p.stem for p in SWEEPS}
    for dataset in ("camvid", "voc", "ade20k"):
        for method in ("mib", "plop", "icd", "dkd"):
            assert f"{dataset}_{method}" in names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_each_shipped_sweep_loads_and_its_space_is_valid(path):
    cfg = load_config(path)
    dims = sweep_space(cfg)
    assert cfg.method.name == path.stem.split("_")[-1] or path.stem == "demo"
    space = search_space(dims)
    assert list(space) == [d.key for d in dims]
    if not cfg.tune.space:  # `space: method`: the method's declared space
        declared = METHODS[cfg.method.name].search_space(cfg)
        assert [d.key for d in dims] == [d.key for d in declared]
        assert "optim.lr_incremental" in space
    # the config round-trips through its YAML form, space included
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["ft", "mib", "plop", "icd", "dkd"])
def test_each_method_declares_a_space_of_keys_it_reads(name):
    base = f"configs/camvid/6-5_{name}.yaml"
    cfg = load_config(base)
    dims = sweep_space(cfg)  # checks every dimension against the schema and the method
    weights = {d.key for d in METHODS[name].search_weights}
    assert weights <= {d.key for d in dims}
    lr = next(d for d in dims if d.key == "optim.lr_incremental")
    assert lr.values == pytest.approx((cfg.optim.lr_incremental / 10,
                                       cfg.optim.lr_incremental * 10))


def test_joint_has_nothing_to_search():
    with pytest.raises(ConfigError, match="tune.space: searches nothing: method 'joint'"):
        sweep_space(load_config("configs/camvid/joint.yaml"))


def test_space_forms_flat_nested_null_and_method(tmp_path):
    flat = load_config("configs/tune/demo.yaml", [
        "tune.space.loss.seg={choice: [unbiased_ce, pseudo_ce]}",
        "tune.space.optim.epochs_incremental={randint: [1, 3]}"])
    nested = load_config("configs/tune/demo.yaml", [
        "tune.space={loss: {seg: {choice: [unbiased_ce, pseudo_ce]}}, "
        "optim: {epochs_incremental: {randint: [1, 3]}}}"])
    assert {d.key: d for d in flat.tune.space} == {d.key: d for d in nested.tune.space}
    assert {d.key for d in flat.tune.space} == {
        "loss.icd.lambda_int", "loss.icd.lambda_ext", "loss.seg", "optim.epochs_incremental"}
    # typed: floats for the log ranges, integers for randint
    by_key = {d.key: d for d in flat.tune.space}
    assert by_key["loss.icd.lambda_int"] == SearchDim("loss.icd.lambda_int", "loguniform",
                                                      (0.1, 10.0))
    assert by_key["optim.epochs_incremental"].values == (1, 3)
    # null drops a dimension; "method" empties the space (the method's own)
    dropped = load_config("configs/tune/demo.yaml", ["tune.space.loss.icd.lambda_ext=null"])
    assert [d.key for d in dropped.tune.space] == ["loss.icd.lambda_int"]
    assert load_config("configs/tune/demo.yaml", ["tune.space=method"]).tune.space == ()
    # the YAML a sweep writes loads back equal
    (tmp_path / "sweep.yaml").write_text(dump_config(flat))
    assert load_config(tmp_path / "sweep.yaml") == flat


@pytest.mark.parametrize("override, message", [
    ("tune.space.loss.pod.lambda_pdo={loguniform: [0.001, 0.1]}",
     "tune.space.loss.pod.lambda_pdo: not a config key: unknown key; allowed keys at "
     "'loss.pod': .*did you mean 'loss.pod.lambda_pod'"),
    ("tune.space.loss.icd.lambda_itn=null", "tune.space.loss.icd.lambda_itn: not a config key"),
    ("tune.space.loss.seg={choice: [ce, focal]}",
     "tune.space.loss.seg: expected one of 'auto', 'ce', 'unbiased_ce', 'pseudo_ce', got "
     "'focal' \\(choice value\\)"),
    ("tune.space.optim.epochs={loguniform: [1, 30]}",
     "tune.space.optim.epochs: is an integer: loguniform does not suit it; use randint"),
    ("tune.space.optim.lr={randint: [1, 3]}",
     "tune.space.optim.lr: is a number: randint does not suit it; use loguniform or uniform"),
    ("tune.space.model.backbone={uniform: [1, 2]}",
     "tune.space.model.backbone: is one of .*: uniform does not suit it; use choice"),
    ("tune.space.loss.icd.lambda_int={loguniform: [0, 3]}",
     "tune.space.loss.icd.lambda_int: loguniform needs low > 0"),
    ("tune.space.loss.icd.lambda_int={uniform: [-1, 3]}",
     "tune.space.loss.icd.lambda_int: must be a number >= 0, got -1.0 \\(uniform value\\)"),
    ("tune.space.optim.momentum={uniform: [0.5, 1.5]}",
     "tune.space.optim.momentum: must be a number in \\[0, 1\\), got 1.5"),
    ("tune.space.loss.icd.tau={uniform: [2, 0.5]}",
     "tune.space.loss.icd.tau: needs low < high"),
    ("tune.space.optim.epochs={randint: [1.5, 3]}",
     "tune.space.optim.epochs: randint takes \\[low, high\\], two integers"),
    ("tune.space.loss.icd.tau=[0.5, 1]",
     "tune.space.loss.icd.tau: expected {distribution: values}"),
    ("tune.space.loss.icd.tau={normal: [0.5, 1]}",
     "tune.space.loss.icd.tau: expected {distribution: values}"),
    ("tune.space.loss={choice: [1]}", "tune.space.loss: not a config key: is a section"),
    ("tune.space.run.seed={randint: [0, 3]}", "tune.space.run.seed: a sweep cannot search run"),
    ("tune.space.task.name={choice: [2-1]}", "tune.space.task.name: a sweep cannot search"),
    ("tune.space.loss.icd.stats={choice: [[mean], [mean]]}",
     "tune.space.loss.icd.stats: choice options repeat"),
    ("tune.space=[1]", "tune.space: expected \"method\" or a mapping"),
])
def test_a_bad_space_is_a_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("configs/tune/demo.yaml", [override])
    assert f"override {override!r}" in str(err.value)  # and where it was set


def test_method_rules_refuse_a_dimension_before_ray_starts(monkeypatch, capsys):
    """What only the method can judge (keys it reads, values it trains with) is refused by
    `python -m icd_dist.tune` before the shards are prepared or Ray starts."""
    import icd_dist.train.sweep as sweep
    from icd_dist.tune import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("got past the space check")

    monkeypatch.setattr(sweep, "prepare_shards", must_not_run)
    monkeypatch.setattr(sweep, "init_ray", must_not_run)
    cases = [
        ("configs/tune/demo.yaml", ["tune.space.loss.pod.lambda_pod={loguniform: [0.001, 1]}"],
         "tune.space.loss.pod.lambda_pod: method 'icd' does not read it"),
        ("configs/tune/camvid_mib.yaml", ["method.name=ft",
                                          "tune.space.loss.seg={choice: [ce, unbiased_ce]}"],
         "tune.space.loss.seg: choice value 'unbiased_ce': loss.seg: method 'ft' trains "
         "with ce"),
        ("configs/tune/camvid_dkd.yaml", ["tune.space.loss.seg={choice: [ce]}"],
         "tune.space.loss.seg: method 'dkd' does not read it; the loss keys it reads: "
         "loss.dkd."),
        ("configs/tune/demo.yaml", ["tune.space.optim.lr={loguniform: [0.01, 0.1]}"],
         "tune.space.optim.lr: shapes the step-0 model, which the sweep trains once"),
        ("configs/tune/camvid_dkd.yaml", ["tune.space.loss.dkd.mbce={uniform: [0.5, 2]}"],
         "tune.space.loss.dkd.mbce: shapes the step-0 model"),
        ("configs/tune/demo.yaml", ["tune.space.optim.batch_size={choice: [8, 7]}",
                                    "engine.num_workers=2", "engine.launcher=ray"],
         "tune.space.optim.batch_size: choice value 7: optim.batch_size: 7 is not a multiple"),
    ]
    for path, overrides, message in cases:
        assert main(["--config", path, *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err, err


def test_trial_values_become_a_typed_config():
    cfg = load_config("configs/tune/demo.yaml", [
        "tune.space.loss.icd.stats={choice: [[mean], [std, max]]}",
        "tune.space.loss.seg={choice: [unbiased_ce, pseudo_ce]}",
        "tune.space.optim.epochs_incremental={lograndint: [1, 4]}"])
    dims = sweep_space(cfg)
    space = search_space(dims)
    # list options travel as JSON text (Optuna's categoricals are scalars); randint includes
    # its upper end
    assert space["loss.icd.stats"].categories == ['["mean"]', '["std", "max"]']
    assert (space["optim.epochs_incremental"].lower,
            space["optim.epochs_incremental"].upper) == (1, 5)
    tune_config = {"schedule": "3-1", "loss.icd.lambda_int": 0.3,
                   "loss.icd.stats": _tune_option(("std", "max")), "loss.seg": "pseudo_ce",
                   "optim.epochs_incremental": 4}
    params = trial_params(dims, tune_config)
    assert params == {"loss.icd.lambda_int": 0.3, "loss.icd.stats": ["std", "max"],
                      "loss.seg": "pseudo_ce", "optim.epochs_incremental": 4}
    tuned = update(cfg, params)
    assert tuned.loss.icd.lambda_int == 0.3 and tuned.loss.icd.stats == ("std", "max")
    assert tuned.loss.seg == "pseudo_ce" and tuned.optim.epochs_incremental == 4
    with pytest.raises(ConfigError, match="loss.icd.gamma: unknown key"):
        update(cfg, {"loss.icd.gamma": 1.0})


def test_check_search_dim_types_the_values():
    dim = check_search_dim(SearchDim("loss.icd.tau", "choice", (1, 2)))
    assert dim.values == (1.0, 2.0) and all(type(v) is float for v in dim.values)
    with pytest.raises(ConfigError, match="tune.space.loss.icd.tau: choice needs"):
        check_search_dim(SearchDim("loss.icd.tau", "choice", ()))


def test_try_config_first_puts_the_configs_own_values_first():
    from icd_dist.train.sweep import config_point

    cfg = load_config("configs/tune/camvid-large_icd.yaml")
    point = config_point(cfg, sweep_space(cfg))
    assert point == {"loss.icd.lambda_int": 1.0, "loss.icd.lambda_ext": 10.0,
                     "loss.lambda_kd": 10.0, "loss.icd.tau": 1.0,
                     "loss.icd.stats": ("mean", "std", "max", "spatial_mean", "spatial_std"),
                     "loss.seg": "unbiased_ce", "optim.lr_incremental": 0.0005}
    # a value the space cannot hold is an error naming the key, not a silent new point
    outside = update(cfg, {"loss.icd.stats": ("max",)})
    with pytest.raises(ConfigError, match=r"tune.try_config_first: the config's "
                       r"loss.icd.stats=\('max',\) is outside its search dimension"):
        config_point(outside, sweep_space(outside))
    wide = update(cfg, {"loss.lambda_kd": 500.0})
    with pytest.raises(ConfigError, match="loss.lambda_kd=500.0 is outside"):
        config_point(wide, sweep_space(wide))
