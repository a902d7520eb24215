"""VOC and ADE20K runs refuse to train without ImageNet weights unless the config says
`model.pretrained: none`; a named file that does not exist stops the run too; CamVid and the
synthetic demo (trained from scratch) are not affected. The check runs before Ray starts."""

from pathlib import Path

import pytest

from icd_dist.config import ConfigError, load_config
from icd_dist.models.pretrained import check_pretrained, pretrained_file

REPO = Path(__file__).resolve().parents[2]
VOC = REPO / "configs" / "voc" / "15-1_icd.yaml"
ADE = REPO / "configs" / "ade20k" / "100-50_mib.yaml"
CAMVID = REPO / "configs" / "camvid" / "6-1_icd.yaml"
DEMO = REPO / "configs" / "demo.yaml"


def assert_names_key_and_formats(err: ConfigError) -> None:
    assert err.key == "model.pretrained"
    text = str(err)
    assert text.startswith("model.pretrained: ")
    assert "resnet101-*.pth" in text and "torchvision" in text  # a torchvision state dict
    assert "resnet101_iabn_sync.pth.tar" in text  # MiB/PLOP's in-place-ABN checkpoint
    assert "model.pretrained=none" in text  # how to train from scratch on purpose


@pytest.mark.parametrize("path", [VOC, ADE], ids=["voc", "ade20k"])
def test_voc_and_ade_without_pretrained_raise(path):
    cfg = load_config(path)  # loading a shipped config still works
    assert cfg.model.pretrained is None
    with pytest.raises(ConfigError) as exc:
        check_pretrained(cfg)
    assert_names_key_and_formats(exc.value)
    assert cfg.data.dataset in str(exc.value)


def test_run_entry_stops_before_ray(no_ray, capsys, tmp_path):
    from icd_dist import run

    assert run.main(["--config", str(VOC), f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "error: model.pretrained: " in err and "resnet101_iabn_sync.pth.tar" in err
    assert not list(tmp_path.iterdir())  # nothing written, no run folder


def test_tune_entry_stops_before_ray(no_ray, capsys, tmp_path):
    from icd_dist import tune

    config = REPO / "configs" / "tune" / "voc_icd.yaml"
    assert tune.main(["--config", str(config), f"run.storage_path={tmp_path}"]) == 2
    assert "error: model.pretrained: " in capsys.readouterr().err


def test_run_schedule_checks_before_anything(no_ray, tmp_path):
    from icd_dist.train.schedule import run_schedule

    cfg = load_config(ADE, [f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError) as exc:
        run_schedule(cfg, log=lambda m: None)
    assert_names_key_and_formats(exc.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["none", "None", "NONE"])
def test_none_passes_and_means_no_file(value):
    cfg = load_config(VOC, [f"model.pretrained={value}"])
    assert cfg.model.pretrained == value  # a string, not null: the choice is recorded
    check_pretrained(cfg)
    assert pretrained_file(value) is None and pretrained_file(None) is None
    assert pretrained_file("w/resnet101.pth") == "w/resnet101.pth"


def test_build_model_with_none_loads_no_file():
    from icd_dist.models.deeplab import build_model

    cfg = load_config(VOC, ["model.pretrained=none", "model.backbone=resnet18",
                            "model.head_channels=16"])
    model = build_model(cfg.model, [16])  # no FileNotFoundError for a file called "none"
    assert model is not None


@pytest.mark.parametrize("path", [VOC, CAMVID], ids=["voc", "camvid"])
def test_missing_file_fails_naming_key_and_path(path, tmp_path):
    missing = tmp_path / "weights" / "resnet101-missing.pth"
    cfg = load_config(path, [f"model.pretrained={missing}"])
    with pytest.raises(ConfigError) as exc:
        check_pretrained(cfg)
    assert exc.value.key == "model.pretrained"
    assert str(missing) in str(exc.value) and "not found" in str(exc.value)


def test_existing_file_passes(tmp_path):
    weights = tmp_path / "resnet101_iabn_sync.pth.tar"
    weights.write_bytes(b"")  # the check is about presence; the format is read at step 0
    check_pretrained(load_config(VOC, [f"model.pretrained={weights}"]))


@pytest.mark.parametrize("path", [CAMVID, DEMO], ids=["camvid", "synthetic-demo"])
def test_camvid_and_synthetic_without_pretrained_pass(path):
    cfg = load_config(path)
    assert cfg.model.pretrained is None and cfg.data.dataset in ("camvid", "synthetic")
    check_pretrained(cfg)
