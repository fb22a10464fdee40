import collections

import numpy as np
import pytest
from PIL import Image

from orestudy import data
from conftest import COLOURS, make_image


def test_every_readable_file_found_whatever_its_name(image_folder):
    records, bad = data.scan_folder(image_folder)
    assert bad == []
    assert len(records) == 30
    names = {r.path.rsplit("/", 1)[1] for r in records}
    assert "azurite_1" in names  # no extension
    assert "azurite_2.gif" in names
    assert "azurite_3.roughjpg" in names
    assert "azurite 4.krista-mitchell.com" in names
    assert {r.format for r in records} == {"JPEG", "PNG", "GIF"}


def test_corrupt_and_truncated_files_reported_and_skipped(image_folder):
    (image_folder / "pyrite" / "notes.txt").write_text("not an image")
    good = (image_folder / "pyrite" / "pyrite_0.jpg").read_bytes()
    (image_folder / "pyrite" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    records, bad = data.scan_folder(image_folder)
    assert len(records) == 30
    assert sorted(b.path.rsplit("/", 1)[1] for b in bad) == ["notes.txt", "truncated.jpg"]
    assert all(b.reason for b in bad)


def test_rgba_palette_and_grey_become_rgb(tmp_path):
    img = make_image((10, 200, 30), seed=1)
    rgba = img.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    rgba.save(tmp_path / "a.png")
    img.convert("P").save(tmp_path / "p.gif")
    img.convert("L").save(tmp_path / "g.png")
    for name in ("a.png", "p.gif", "g.png"):
        out = data.load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == img.size
    assert np.asarray(data.load_rgb(tmp_path / "a.png")).min() == 255


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.scan_folder(tmp_path / "nowhere")


@pytest.fixture
def larger_folder(tmp_path):
    """4 classes x 25 images, with 3 near-duplicate pairs (a re-encoded, slightly brightened copy)."""
    root = tmp_path / "set"
    for c, name in enumerate(["a", "b", "c", "d"]):
        (root / name).mkdir(parents=True)
        for i in range(25):
            make_image(list(COLOURS.values())[c % 3], seed=1000 * c + i, size=(64, 64)).save(root / name / f"{i}.png")
    for name, i in (("a", 0), ("b", 3), ("d", 7)):
        original = Image.open(root / name / f"{i}.png")
        brighter = Image.fromarray(np.clip(np.asarray(original, dtype=np.int16) + 6, 0, 255).astype(np.uint8))
        brighter.save(root / name / f"{i}_copy.jpg", quality=90)
    return root


@pytest.mark.parametrize("method", data.SPLIT_METHODS)
def test_split_is_stratified_seeded_and_keeps_near_duplicates_together(larger_folder, method):
    records, _ = data.scan_folder(larger_folder)
    groups = data.near_duplicate_groups(records)
    by_path = {r.path.rsplit("/", 2)[1] + "/" + r.path.rsplit("/", 1)[1]: g for r, g in zip(records, groups)}
    for name, i in (("a", 0), ("b", 3), ("d", 7)):
        assert by_path[f"{name}/{i}.png"] == by_path[f"{name}/{i}_copy.jpg"], "near-duplicate not grouped"
    assert len(set(groups)) == len(records) - 3  # nothing else merged

    split = data.make_split(records, seed=231, method=method)
    assert split == data.make_split(records, seed=231, method=method)
    assert split != data.make_split(records, seed=1, method=method)
    counts = collections.Counter(split)
    # shuffle: shares as exact as the groups allow; hash: binomial around them (4 sd: sd about 5 here)
    tolerance = 4 if method == "shuffle" else 4 * (0.6 * 0.4 * len(records)) ** 0.5
    assert counts["train"] == pytest.approx(0.6 * len(records), abs=tolerance)
    assert counts["val"] == pytest.approx(0.2 * len(records), abs=tolerance)
    least = (13, 4, 4) if method == "shuffle" else (1, 1, 1)
    for label in "abcd":
        per_class = collections.Counter(s for r, s in zip(records, split) if r.label == label)
        assert all(per_class[part] >= n for part, n in zip(data.SPLITS, least)), per_class
    for group in set(groups):
        assert len({s for s, g in zip(split, groups) if g == group}) == 1, "a group straddles splits"


def test_hash_split_keeps_every_photo_put_when_photos_are_added_or_removed(larger_folder, tmp_path, capsys):
    records, _ = data.scan_folder(larger_folder)
    folder = tmp_path / "splits"
    before = {m: data.dataset_split(records, 231, folder, larger_folder, method=m) for m in data.SPLIT_METHODS}
    assert "changed since" not in capsys.readouterr().err
    for c, name in enumerate("abcd"):  # a new photo in every class, and one deleted
        make_image(list(COLOURS.values())[c % 3], seed=5000 + c, size=(64, 64)).save(larger_folder / name / "new.png")
    (larger_folder / "c" / "5.png").unlink()
    grown, _ = data.scan_folder(larger_folder)

    split, manifest = data.dataset_split(grown, 231, folder, larger_folder)  # hash, the default
    assert manifest != before["hash"][1] and manifest.name.endswith("-hash-seed231.csv")
    old = {r.sha256: s for r, s in zip(records, before["hash"][0])}
    assert all(old[r.sha256] == s for r, s in zip(grown, split) if r.sha256 in old)
    said = capsys.readouterr().err
    assert f"changed since split manifest {before['hash'][1]}: 4 images added, 1 removed; 0 of the " \
           f"{len(records) - 1} images in both changed split" in said

    # The shuffle split of earlier versions redraws, and says so.
    split, manifest = data.dataset_split(grown, 231, folder, larger_folder, method="shuffle")
    old = {r.sha256: s for r, s in zip(records, before["shuffle"][0])}
    moved = sum(old[r.sha256] != s for r, s in zip(grown, split) if r.sha256 in old)
    said = capsys.readouterr().err
    assert moved > 10 and f"4 images added, 1 removed; {moved} of the" in said and "--split-method hash" in said
    # Said once: later runs on these data say nothing; data back at the earlier version say it once more.
    grown_manifest = data.dataset_split(grown, 231, folder, larger_folder)[1]
    assert "changed since" not in capsys.readouterr().err
    data.dataset_split(records, 231, folder, larger_folder)
    assert f"changed since split manifest {grown_manifest}: 1 images added, 4 removed" in capsys.readouterr().err
    data.dataset_split(records, 231, folder, larger_folder)
    assert "changed since" not in capsys.readouterr().err


def test_manifest_written_once_reused_and_checked(larger_folder, tmp_path):
    records, _ = data.scan_folder(larger_folder)
    manifest = tmp_path / "split.csv"
    first = data.load_or_make_split(records, 231, manifest, larger_folder)
    header = manifest.read_text().splitlines()[0]
    assert header == "path,sha256,label,split,group"
    assert data.load_or_make_split(records, 999, manifest, larger_folder) == first  # reused, not redrawn
    with pytest.raises(ValueError, match="does not match"):
        data.load_or_make_split(records[:-1], 231, manifest, larger_folder)


def test_paper_views_fixed_and_sized(image_folder):
    records, _ = data.scan_folder(image_folder)
    for view in data.PAPER_VIEWS:
        a = data.make_view(records[0], view, 32, seed=231)
        b = data.make_view(records[0], view, 32, seed=231)
        assert a.shape == (3, 32, 32) and a.dtype.is_floating_point is False
        assert (a == b).all(), f"view {view} is not reproducible"
    online = [data.make_view(records[0], f"identity+online{k}", 32, 231, strength=1.0) for k in range(3)]
    assert not (online[0] == online[1]).all()
    with pytest.raises(ValueError, match="strength"):
        data.online_augment(1.5, 32)


def test_scan_cache_reuses_unchanged_files_only(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "scan.json"
    first, _ = data.scan_folder(image_folder, cache_file=cache)
    decoded = []
    real = data.load_rgb
    monkeypatch.setattr(data.images, "load_rgb", lambda p: decoded.append(p) or real(p))
    changed = image_folder / "pyrite" / "pyrite_0.jpg"
    make_image((0, 0, 0), seed=7).save(changed, format="JPEG")
    second, _ = data.scan_folder(image_folder, cache_file=cache)
    assert len(decoded) == 1  # only the changed file was decoded again
    assert [r.path for r in second] == [r.path for r in first]
    assert {r.path for r, s in zip(first, second) if r.sha256 != s.sha256} == {str(changed)}


def test_folds_partition_the_non_test_images_and_keep_groups_whole(larger_folder):
    records, _ = data.scan_folder(larger_folder)
    groups = data.near_duplicate_groups(records)
    split = data.make_split(records, seed=231)
    vals = []
    for fold in range(3):
        cut = data.fold_split(records, split, 3, fold, seed=231)
        assert [s for s in cut if s == "test"] == [s for s in split if s == "test"]
        assert all(c == "test" for c, s in zip(cut, split) if s == "test")  # the test split stays put
        for group in set(groups):
            assert len({s for s, g in zip(cut, groups) if g == group}) == 1, "a group straddles folds"
        for label in "abcd":
            assert sum(c == "val" and r.label == label for r, c in zip(records, cut)) >= 5  # stratified
        vals.append({i for i, c in enumerate(cut) if c == "val"})
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    assert set.union(*vals) == {i for i, s in enumerate(split) if s != "test"}
    assert data.fold_split(records, split, 3, 1, seed=231) == data.fold_split(records, split, 3, 1, seed=231)
