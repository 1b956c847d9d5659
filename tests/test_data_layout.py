"""Dataset layout parsing, on tiny real JPEGs written in each benchmark's real folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amg.data.layout import (
    DatasetError,
    ReIDImageDataset,
    Sample,
    load_dataset,
    read_image,
    relabel_pids,
)


def _jpg(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (shade, 255 - shade, 7)).save(path, "JPEG")
    return path


def _folder_dataset(data_dir: Path, train: list[str], query: list[str], gallery: list[str]) -> Path:
    for split, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        (data_dir / split).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            _jpg(data_dir / split / name, shade=10 * i)
    return data_dir


MARKET_TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                "0007_c3s3_015475_04.jpg", "0010_c6s4_002377_01.jpg"]
MARKET_QUERY = ["0002_c5s1_000401_00.jpg", "0007_c1s1_000151_00.jpg"]
MARKET_GALLERY = ["-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg",  # junk, distractor
                  "0002_c4s1_000426_01.jpg", "0007_c2s1_000176_01.jpg"]


def make_market(root: Path) -> Path:
    data = _folder_dataset(root / "Market-1501-v15.09.15", MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    (data / "bounding_box_train" / "Thumbs.db").write_bytes(b"\x00junk")
    (data / "bounding_box_test" / "readme.txt").write_text("not an image")
    return data


DUKE_TRAIN = ["0005_c2_f0046985.jpg", "0005_c5_f0051781.jpg", "0008_c8_f0113297.jpg"]
DUKE_QUERY = ["0005_c1_f0044158.jpg"]
DUKE_GALLERY = ["0005_c7_f0039281.jpg", "0008_c3_f0061520.jpg"]


def make_duke(root: Path, release_dir: str = "DukeMTMC-reID") -> Path:
    return _folder_dataset(root / release_dir, DUKE_TRAIN, DUKE_QUERY, DUKE_GALLERY)


def make_msmt(root: Path, version: str = "MSMT17_V1") -> Path:
    """MSMT17: pid sub-folders of images, addressed by list files whose label is the pid."""
    data = root / version
    train_dir, test_dir = ("train", "test") if version != "MSMT17_V2" else ("mask_train_v2", "mask_test_v2")
    lists = {
        ("list_train.txt", train_dir): [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                        ("0000/0000_001_15_0303noon_0102_1.jpg", 0),
                                        ("0001/0001_000_07_0303afternoon_0033_0.jpg", 1)],
        ("list_val.txt", train_dir): [("0002/0002_000_03_0303morning_0871_0.jpg", 2)],
        ("list_query.txt", test_dir): [("0000/0000_002_04_0113morning_0009_0.jpg", 0)],
        ("list_gallery.txt", test_dir): [("0000/0000_003_12_0113noon_0016_1.jpg", 0),
                                         ("0001/0001_000_02_0113noon_0320_0.jpg", 1)],
    }
    for (list_name, image_dir), entries in lists.items():
        for rel, _ in entries:
            _jpg(data / image_dir / rel)
        (data / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return data


def names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


# ----------------------------------------------------------------------------- layouts load


def test_market_loads_pids_camids_and_keeps_junk_and_distractors(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    ds = load_dataset(tmp_path)  # root holds the release folder, as torchreid expects
    assert ds.name == "market1501" and ds.root == data
    assert names(ds.train) == sorted(MARKET_TRAIN)  # Thumbs.db skipped, order deterministic
    assert [(s.pid, s.camid) for s in ds.train] == [(2, 0), (2, 1), (7, 2), (10, 5)]
    assert ds.num_train_pids == 3
    assert list(ds.query_sets) == ["query"]
    assert [(s.pid, s.camid) for s in ds.query_sets["query"]] == [(2, 4), (7, 0)]
    assert sorted(s.pid for s in ds.gallery) == [-1, 0, 2, 7]  # readme.txt skipped
    assert ds.num_cameras == 6
    assert all(s.path.is_file() for s in ds.train + ds.gallery)


def test_market_root_can_be_the_release_folder_itself(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    ds = load_dataset(str(data), layout="market1501")
    assert ds.name == "market1501" and len(ds.train) == 4 and len(ds.gallery) == 4


@pytest.mark.parametrize("release_dir, expected", [("DukeMTMC-reID", "dukemtmc"), ("Occluded_Duke", "occluded_duke")])
def test_duke_and_occluded_duke_load(tmp_path: Path, release_dir: str, expected: str) -> None:
    make_duke(tmp_path, release_dir)
    ds = load_dataset(tmp_path)
    assert ds.name == expected
    assert [(s.pid, s.camid) for s in ds.train] == [(5, 1), (5, 4), (8, 7)]  # c8 -> camid 7
    assert [(s.pid, s.camid) for s in ds.query_sets["query"]] == [(5, 0)]
    assert [(s.pid, s.camid) for s in ds.gallery] == [(5, 6), (8, 2)]
    assert ds.num_train_pids == 2 and ds.num_cameras == 8


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_list_layout(tmp_path: Path, version: str) -> None:
    data = make_msmt(tmp_path, version)
    ds = load_dataset(tmp_path)
    assert ds.name == "msmt17" and ds.root == data
    # train = list_train + list_val, in list order; camera is the third name field, 1-based.
    assert [(s.pid, s.camid) for s in ds.train] == [(0, 0), (0, 14), (1, 6), (2, 2)]
    assert ds.num_train_pids == 3  # pid 0 is a real MSMT17 identity
    assert [(s.pid, s.camid) for s in ds.query_sets["query"]] == [(0, 3)]
    assert [(s.pid, s.camid) for s in ds.gallery] == [(0, 11), (1, 1)]
    image_dir = "train" if version == "MSMT17_V1" else "mask_train_v2"
    assert ds.train[0].path == data / image_dir / "0000" / "0000_000_01_0303morning_0015_0.jpg"


def test_msmt17_root_can_hold_list_files_directly(tmp_path: Path) -> None:
    # TransReID keeps MSMT17/{train,test,list_*.txt} without the MSMT17_V1 level.
    data = make_msmt(tmp_path, "MSMT17_V1")
    plain = data.rename(tmp_path / "whatever")
    ds = load_dataset(plain)
    assert ds.name == "msmt17" and len(ds.train) == 4


def test_msmt17_converted_to_market_folders(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path / "converted",
                           ["0000_c1_0000.jpg", "0000_c14_0001.jpg", "0003_c15_0000.jpg"],
                           ["0000_c2_0000.jpg"],
                           ["0000_c9_0000.jpg", "0000_000_12_0303morning_0015_0.jpg"])
    ds = load_dataset(data, layout="msmt17")
    assert ds.name == "msmt17"
    assert [(s.pid, s.camid) for s in ds.train] == [(0, 13), (0, 0), (3, 14)]  # sorted by name
    assert [(s.pid, s.camid) for s in ds.gallery] == [(0, 11), (0, 8)]


def test_auto_detects_from_file_names_in_a_neutral_folder(tmp_path: Path) -> None:
    market = _folder_dataset(tmp_path / "a", MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    duke = _folder_dataset(tmp_path / "b", DUKE_TRAIN, DUKE_QUERY, DUKE_GALLERY)
    assert load_dataset(market).name == "market1501"
    assert load_dataset(duke).name == "dukemtmc"


def test_extra_query_folders_become_query_sets(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    _jpg(data / "query_occluded" / "0002_c5s1_000401_00.jpg")
    _jpg(data / "query_occluded" / "0007_c1s1_000151_00.jpg")
    ds = load_dataset(tmp_path)
    assert list(ds.query_sets) == ["query", "occluded"]
    assert [s.pid for s in ds.query_sets["occluded"]] == [2, 7]
    assert ds.query_sets["occluded"][0].path.parent.name == "query_occluded"


def test_summary_table(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    _jpg(data / "query_occluded" / "0002_c5s1_000401_00.jpg")
    lines = load_dataset(tmp_path).summary().splitlines()
    assert "market1501" in lines[0]
    assert lines[1].split() == ["split", "images", "identities", "cameras"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows == {"train": ["4", "3", "4"], "query": ["2", "2", "2"],
                    "query_occluded": ["1", "1", "1"], "gallery": ["4", "3", "3"]}


# ----------------------------------------------------------------------------- bad input


def _raises(match: str):
    return pytest.raises(DatasetError, match=match)


def test_missing_root(tmp_path: Path) -> None:
    with _raises("no_such_dataset"):
        load_dataset(tmp_path / "no_such_dataset")


def test_unknown_layout(tmp_path: Path) -> None:
    make_market(tmp_path)
    with _raises("cuhk03"):
        load_dataset(tmp_path, layout="cuhk03")


def test_missing_split_folder_names_it(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    for f in (data / "bounding_box_test").iterdir():
        f.unlink()
    (data / "bounding_box_test").rmdir()
    with _raises("bounding_box_test"):
        load_dataset(tmp_path)


def test_malformed_name_is_not_skipped(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    _jpg(data / "bounding_box_train" / "0002_c1_000451.jpg")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    assert "0002_c1_000451.jpg" in str(err.value) and "PPPP_cCsS_FFFFFF_NN.jpg" in str(err.value)


def test_empty_split(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    for f in (data / "query").iterdir():
        f.unlink()
    with _raises(r"query.*no images"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    "make, split, name",
    [(make_market, "bounding_box_train", "0002_c7s1_000451_03.jpg"),
     (make_market, "query", "0002_c0s1_000451_03.jpg"),
     (make_duke, "bounding_box_test", "0005_c9_f0046985.jpg")],
)
def test_camera_out_of_range(tmp_path: Path, make, split: str, name: str) -> None:
    data = make(tmp_path)
    _jpg(data / split / name)
    with _raises(name):
        load_dataset(tmp_path)


def test_msmt17_camera_out_of_range(tmp_path: Path) -> None:
    data = make_msmt(tmp_path)
    rel = "0000/0000_009_16_0303morning_0015_0.jpg"
    _jpg(data / "test" / rel)
    with (data / "list_gallery.txt").open("a") as f:
        f.write(f"{rel} 0\n")
    with _raises(r"camera 16.*list_gallery\.txt:3"):
        load_dataset(tmp_path)


def test_msmt17_list_line_to_missing_file(tmp_path: Path) -> None:
    data = make_msmt(tmp_path)
    (data / "test" / "0001" / "0001_000_02_0113noon_0320_0.jpg").unlink()
    with _raises("0001_000_02_0113noon_0320_0.jpg"):
        load_dataset(tmp_path)


def test_msmt17_malformed_list_line(tmp_path: Path) -> None:
    data = make_msmt(tmp_path)
    (data / "list_query.txt").write_text("0000/0000_002_04_0113morning_0009_0.jpg\n")
    with _raises(r"list_query\.txt:1"):
        load_dataset(tmp_path)


def test_msmt17_missing_list_file(tmp_path: Path) -> None:
    data = make_msmt(tmp_path)
    (data / "list_val.txt").unlink()
    with _raises("list_val.txt"):
        load_dataset(tmp_path)


def test_msmt17_missing_image_folder(tmp_path: Path) -> None:
    data = make_msmt(tmp_path)
    (data / "test").rename(data / "testing")
    with _raises(r"test/.*mask_test_v2/"):
        load_dataset(tmp_path)


def test_explicit_layout_that_does_not_match(tmp_path: Path) -> None:
    make_market(tmp_path / "m")
    make_duke(tmp_path / "d", "Occluded_Duke")
    with _raises("Market-1501"):  # folder files look like Market, not MSMT17
        load_dataset(tmp_path / "m" / "Market-1501-v15.09.15", layout="msmt17")
    with _raises("msmt17"):  # no MSMT17 release folder in the root
        load_dataset(tmp_path / "m", layout="msmt17")
    with _raises("Occluded_Duke"):  # same file grammar, but the release folder says occluded
        load_dataset(tmp_path / "d" / "Occluded_Duke", layout="dukemtmc")
    with _raises("Occluded_Duke"):
        load_dataset(tmp_path / "d" / "Occluded_Duke", layout="market1501")
    # In renamed folders the file names decide.
    market = _folder_dataset(tmp_path / "plain_m", MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    duke = _folder_dataset(tmp_path / "plain_d", DUKE_TRAIN, DUKE_QUERY, DUKE_GALLERY)
    with _raises(r"'msmt17'.*plain_m.*'market1501'"):
        load_dataset(market, layout="msmt17")
    with _raises(r"'market1501'.*plain_d.*'dukemtmc'"):
        load_dataset(duke, layout="market1501")
    assert load_dataset(duke, layout="occluded_duke").name == "occluded_duke"


def test_ambiguous_root_needs_explicit_layout(tmp_path: Path) -> None:
    make_duke(tmp_path, "DukeMTMC-reID")
    make_duke(tmp_path, "Occluded_Duke")
    with _raises("several datasets"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, layout="occluded_duke").root == tmp_path / "Occluded_Duke"


def test_undetectable_layout(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path / "x", ["0000_c1_0000.jpg"], ["0000_c2_0000.jpg"], ["0000_c3_0000.jpg"])
    with _raises("pass layout="):
        load_dataset(data)


# ----------------------------------------------------------------------------- labels and images


def test_relabel_is_contiguous_in_sorted_pid_order(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / f"{i}.jpg", pid, 0) for i, pid in enumerate([42, 7, 42, 0, 1500])]
    labels, pid2label = relabel_pids(samples)
    assert pid2label == {0: 0, 7: 1, 42: 2, 1500: 3}
    assert labels == [2, 1, 2, 0, 3]


def test_relabel_rejects_junk(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / "ok.jpg", 3, 0), Sample(tmp_path / "junk_one.jpg", -1, 1)]
    with _raises("junk_one.jpg"):
        relabel_pids(samples)


def test_read_image_rgb_and_corrupt(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (3, 5), 9).save(gray)
    img = read_image(gray)
    assert img.mode == "RGB" and img.size == (3, 5)
    bad = tmp_path / "0002_c1s1_000451_03.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with _raises("0002_c1s1_000451_03.jpg"):
        read_image(bad)
    truncated = _jpg(tmp_path / "truncated.jpg")
    truncated.write_bytes(truncated.read_bytes()[:40])
    with _raises("truncated.jpg"):
        read_image(truncated)
    with _raises("missing.jpg"):
        read_image(tmp_path / "missing.jpg")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0


def test_image_dataset_items(tmp_path: Path) -> None:
    make_market(tmp_path)
    ds = load_dataset(tmp_path)
    labels, _ = relabel_pids(ds.train)
    items = ReIDImageDataset(ds.train, _to_tensor, labels)
    assert len(items) == 4
    image, label, camid, index = items[2]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 4)
    assert (label, camid, index) == (1, 2, 2)
    unlabeled = ReIDImageDataset(ds.gallery, _to_tensor)
    assert [unlabeled[i][1] for i in range(len(unlabeled))] == [-1, 0, 2, 7]
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=4)))
    assert batch[0].shape == (4, 3, 8, 4) and batch[1].tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match=r"got 2 labels for \d+ samples"):
        ReIDImageDataset(ds.train, _to_tensor, labels[:2])


def test_image_dataset_names_corrupt_file(tmp_path: Path) -> None:
    data = make_market(tmp_path)
    ds = load_dataset(tmp_path)
    (data / "bounding_box_train" / "0007_c3s3_015475_04.jpg").write_bytes(b"\xff\xd8 broken")
    items = ReIDImageDataset(ds.train, _to_tensor)
    items[0]  # the intact ones still load
    with _raises("0007_c3s3_015475_04.jpg"):
        items[2]
