"""`python -m icd_dist.tasks` on a small made-up folder of label PNGs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from icd_dist.css import get_dataset
from icd_dist.data.labels import (
    LabelFileError,
    classes_present,
    read_label_ids,
    sample_ids_from_list,
)
from icd_dist.tasks import main

# Class ids per image (VOC 15-1); "p" = palette PNG, "g" = grayscale PNG.
IMAGES = {
    "2007_000001": ("p", [0, 1, 2]),         # step 0
    "2007_000002": ("g", [0, 5, 16, 255]),   # overlap: 0, 1 | disjoint: 1
    "2007_000003": ("p", [0, 17]),           # step 2
    "2007_000004": ("g", [0, 16, 17]),       # overlap: 1, 2 | disjoint: 2
    "2007_000005": ("p", [0, 255]),          # none
    "2007_000006": ("g", [20, 3]),           # overlap: 0, 5 | disjoint: 5 (20 is seen there)
}
OVERLAP = [3, 2, 2, 0, 0, 1]
DISJOINT = [1, 1, 2, 0, 0, 1]


def voc_palette():
    # The VOC colour map: colours differ from indices, so reading colours would be wrong.
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_label(path, kind, ids):
    arr = np.zeros((12, 10), dtype=np.uint8)
    for k, c in enumerate(ids):
        arr[k * 2:(k + 1) * 2, :] = c
    arr[len(ids) * 2:, :] = ids[0]
    img = Image.fromarray(arr, mode="P" if kind == "p" else "L")
    if kind == "p":
        img.putpalette(voc_palette())
    img.save(path)


@pytest.fixture
def label_dir(tmp_path):
    d = tmp_path / "SegmentationClassAug"
    d.mkdir()
    for key, (kind, ids) in IMAGES.items():
        write_label(d / f"{key}.png", kind, ids)
    return d


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_palette_png_read_by_index_not_colour(label_dir):
    ids = read_label_ids(label_dir / "2007_000001.png")
    assert sorted(np.unique(ids).tolist()) == [0, 1, 2]
    with Image.open(label_dir / "2007_000001.png") as img:
        assert img.mode == "P"


def test_counts_from_voc_style_list(label_dir, tmp_path, capsys):
    lst = tmp_path / "train_aug.txt"
    lst.write_text("".join(f"/JPEGImages/{k}.jpg /SegmentationClassAug/{k}.png\n" for k in IMAGES))
    out = run_json(capsys, ["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir),
                            "--list", str(lst), "--json", "--workers", "2"])
    assert [s["num_images"] for s in out["steps"]] == OVERLAP
    assert out["steps"][1] == {"step": 1, "classes": [16], "num_images": 2}


def test_counts_disjoint_from_id_list_and_whole_folder(label_dir, tmp_path, capsys):
    lst = tmp_path / "ids.txt"
    lst.write_text("\n".join(IMAGES) + "\n\n")
    out = run_json(capsys, ["--dataset", "voc", "--task", "15-1", "--setting", "disjoint",
                            "--labels", str(label_dir), "--list", str(lst), "--json"])
    assert out["setting"] == "disjoint"
    assert [s["num_images"] for s in out["steps"]] == DISJOINT
    out = run_json(capsys, ["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir),
                            "--json", "--workers", "1"])
    assert [s["num_images"] for s in out["steps"]] == OVERLAP


def test_subset_of_list_is_respected(label_dir, tmp_path, capsys):
    lst = tmp_path / "two.txt"
    lst.write_text("2007_000002\n2007_000006\n")
    out = run_json(capsys, ["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir),
                            "--list", str(lst), "--json"])
    assert [s["num_images"] for s in out["steps"]] == [2, 1, 0, 0, 0, 1]


def test_table_output_and_errors(label_dir, tmp_path, capsys):
    assert main(["--dataset", "voc", "--task", "15-5"]) == 0
    table = capsys.readouterr().out
    assert "voc 15-5 (overlap), 2 steps" in table and "16:pottedplant" in table
    assert main(["--dataset", "coco", "--task", "15-1"]) == 2
    assert "known datasets: voc, ade20k, camvid" in capsys.readouterr().err
    assert main(["--dataset", "voc", "--task", "14-2"]) == 2
    assert "known tasks: 19-1, 15-5, 15-1, 10-1, 5-3, offline" in capsys.readouterr().err
    lst = tmp_path / "missing.txt"
    lst.write_text("2007_000001\nnot_there\n")
    assert main(["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir),
                 "--list", str(lst)]) == 2
    assert "not_there.png" in capsys.readouterr().err


def test_bad_label_files_are_named(label_dir, capsys):
    Image.new("RGB", (4, 4), (128, 0, 0)).save(label_dir / "rgb.png")
    assert main(["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir)]) == 2
    err = capsys.readouterr().err
    assert "rgb.png" in err and "colours, not class ids" in err
    (label_dir / "rgb.png").unlink()
    write_label(label_dir / "bad_ids.png", "g", [0, 42])
    assert main(["--dataset", "voc", "--task", "15-1", "--labels", str(label_dir)]) == 2
    err = capsys.readouterr().err
    assert "bad_ids.png" in err and "[42]" in err


def test_camvid_mapping_and_void(tmp_path):
    arr = np.array([[0, 5, 10, 11]], dtype=np.uint8)
    assert classes_present(arr, get_dataset("camvid")) == [1, 6, 11, 255]
    with pytest.raises(ValueError, match=r"\[12\]"):
        classes_present(np.array([[12]], dtype=np.uint8), get_dataset("camvid"))
    with pytest.raises(LabelFileError, match="cannot read"):
        (tmp_path / "x.png").write_bytes(b"not a png")
        read_label_ids(tmp_path / "x.png")


def test_list_file_forms(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("# comment\nA_1\ntrain/B_2.jpg trainannot/B_2.png\nC.3\n")
    assert sample_ids_from_list(lst) == ["A_1", "B_2", "C.3"]


def test_module_entry_point_prints_json():
    out = subprocess.run([sys.executable, "-m", "icd_dist.tasks", "--dataset", "voc", "--task",
                          "15-1", "--json"], check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    assert data["steps"][0]["classes"] == list(range(16))
    assert [s["classes"] for s in data["steps"][1:]] == [[16], [17], [18], [19], [20]]
