"""Nothing silently wrong: odd images decode as a viewer shows them, a data set that cannot be split
fairly is refused, a diverging run stops, bad options and damaged caches get one line, and
near-duplicate grouping stays linear in memory with the groups it always made."""
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, make_image, png_folder
from orestudy import data, files
from orestudy.commands import eda, predict, search, train
from orestudy.run import prediction, training
from orestudy.studies import search_space
from orestudy.config import TrainConfig
from orestudy.data import ImageRecord
from orestudy.run.features import FeatureCache

# ---------------------------------------------------------------------------------------------------
# Decoding


def test_16_bit_grey_scaled_not_clipped(tmp_path):
    ramp = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    out = np.asarray(data.load_rgb(tmp_path / "deep.png"))
    assert out.shape == (40, 48, 3)
    assert np.array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))  # PIL alone: 99.6 % white
    floats = Image.fromarray((ramp / 65535).astype(np.float32))
    assert np.abs(np.asarray(data.load_rgb(_saved(floats, "TIFF"))).astype(int)[..., 0] - ramp / 257).max() <= 1


def _saved(img: Image.Image, fmt: str, **kwargs) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    buf.seek(0)
    return buf


def test_exif_orientation_applied_in_training_and_prediction(tmp_path):
    ramp = np.linspace(0, 255, 64)[None, :, None] * np.array([0.2, 0.5, 1.0])  # smooth: JPEG keeps it
    img = Image.fromarray(np.broadcast_to(ramp, (40, 64, 3)).astype(np.uint8))
    img.paste((255, 0, 0), (0, 0, 16, 40))  # a red left edge shows which way is up
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "turned.jpg", quality=95, exif=exif.tobytes())
    upright = img.transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")

    shown = data.load_rgb(tmp_path / "turned.jpg")
    assert shown.size == (40, 64)
    assert np.asarray(shown)[:8, :, 0].mean() > 200  # the red edge is now on top
    served = prediction.eval_input(tmp_path / "turned.jpg", 32).int()
    assert (served - prediction.eval_input(tmp_path / "upright.png", 32).int()).abs().float().mean() < 3
    (folder := tmp_path / "set" / "a").mkdir(parents=True)
    shutil.copy(tmp_path / "turned.jpg", folder)
    (record,), _ = data.scan_folder(tmp_path / "set")
    assert (record.width, record.height) == (40, 64)


# ---------------------------------------------------------------------------------------------------
# Class sanity


def test_loose_files_and_empty_classes_are_reported(tmp_path, capsys):
    root = png_folder(tmp_path / "set", per_class=2)
    make_image((0, 0, 0), seed=1).save(root / "stray.png")
    (root / "empty_class").mkdir()
    records, _ = data.scan_folder(root)
    err = capsys.readouterr().err
    assert "1 files directly in" in err and "empty_class" in err
    assert {r.label for r in records} == set(COLOURS)


def test_a_class_too_small_to_stratify_is_refused_naming_it(tmp_path, capsys):
    root = png_folder(tmp_path / "set", per_class=8)
    for extra in ("pyrite_2.png", "pyrite_3.png", "pyrite_4.png", "pyrite_5.png", "pyrite_6.png", "pyrite_7.png"):
        (root / "pyrite" / extra).unlink()
    records, _ = data.scan_folder(root)
    with pytest.raises(data.DataError, match="class 'pyrite' has 2 images in 2 near-duplicate groups"):
        data.make_split(records, 231)
    with pytest.raises(SystemExit):
        train.main(["--data", str(root), "--runs", str(tmp_path / "runs"), "--cache", "", "--no-mlflow",
                    "--threads", "1"])
    assert _one_error_line(capsys, "pyrite")


def _one_error_line(capsys, *words) -> bool:
    err = capsys.readouterr().err.strip().splitlines()
    return "Traceback" not in "\n".join(err) and all(w in err[-1] for w in ("error:", *words))


# ---------------------------------------------------------------------------------------------------
# A diverging run stops


def test_nan_loss_stops_the_run_naming_the_epoch(tmp_path, monkeypatch):
    root = png_folder(tmp_path / "set", per_class=6)
    monkeypatch.setattr(data, "train_channel_stats", lambda *a: ([0.5] * 3, [0.0] * 3))  # as a bad cache had
    config = TrainConfig(data=str(root), output=str(tmp_path / "runs"), cache="", regime="scratch", epochs=2,
                         freeze_epochs=0, image_size=32, batch_size=8, threads=1, progress=False, mlflow=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan in epoch 1/2"):
        training.run_experiment(config)


# ---------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("option, value", [("--lr", "-0.1"), ("--lr", "0"), ("--dropout", "1"), ("--dropout", "-0.1"),
                                           ("--seed", "-1"), ("--image-size", "-5"), ("--image-size", "8"),
                                           ("--threads", "-2"), ("--batch-size", "0"), ("--aug-bank", "0"),
                                           ("--precision", "fp16")])
def test_bad_options_get_one_line(option, value, capsys):
    with pytest.raises(SystemExit):
        train.main([option, value])
    assert _one_error_line(capsys, option[2:].replace("-", "_"))


def test_yaml_configs_are_checked_the_same_way():
    with pytest.raises(ValueError, match="grid.yaml: dropout must be in"):
        TrainConfig.from_dict({"dropout": 1.5}, source="grid.yaml")
    with pytest.raises(search_space.SearchSpaceError, match="space.yaml: params.lr: lr must be a positive number"):
        search_space.check_config(Path("space.yaml"), "params.lr", {"lr": -1e-3})


def test_missing_data_folder_and_garbage_checkpoint_get_one_line(tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    for main in (lambda: train.main(["--data", nowhere, "--runs", str(tmp_path / "runs"), "--no-mlflow"]),
                 lambda: eda.main(["--data", nowhere, "--output", str(tmp_path / "eda"), "--no-mlflow"]),
                 lambda: search.main(["smoke", "--data", nowhere, "--runs", str(tmp_path / "s")])):
        with pytest.raises(SystemExit):
            main()
        assert _one_error_line(capsys, "nowhere")
    garbage = tmp_path / "best.pt"
    garbage.write_bytes(os.urandom(500))
    with pytest.raises(SystemExit):
        predict.main(["--model", str(garbage), "x.png"])
    assert _one_error_line(capsys, str(garbage), "not a readable orestudy checkpoint")


# ---------------------------------------------------------------------------------------------------
# Caches


def test_damaged_scan_and_stats_caches_are_rebuilt(tmp_path, capsys):
    root = png_folder(tmp_path / "set", per_class=3)
    scan = tmp_path / "scan.json"
    first, _ = data.scan_folder(root, cache_file=scan)
    for damaged in (scan.read_text()[:50], "garbage", "[1, 2]", json.dumps({"x": {"stamp": 1}})):
        scan.write_text(damaged)
        again, _ = data.scan_folder(root, cache_file=scan)
        assert again == first and str(scan) in capsys.readouterr().err
        assert json.loads(scan.read_text())  # rebuilt whole
    stats = data.train_channel_stats(first, 32, str(tmp_path / "cache"))
    (path,) = (tmp_path / "cache" / "stats").iterdir()
    for damaged in ('[[0.5, 0.5', "[[0.5, 0.5, 0.5], [0.2, 0.0, 0.2]]", '[[0.5, 0.5, 0.5], [0.2, NaN, 0.2]]', "{}"):
        path.write_text(damaged)
        assert data.train_channel_stats(first, 32, str(tmp_path / "cache")) == tuple(stats)
        assert str(path) in capsys.readouterr().err


def test_scan_cache_sees_new_bytes_behind_an_old_size_and_time(tmp_path):
    root = png_folder(tmp_path / "set", per_class=2)
    target = root / "pyrite" / "raw.ppm"  # raw pixels: a changed byte keeps the file valid and its size
    make_image((0, 0, 0), seed=5).save(target)
    scan = tmp_path / "scan.json"
    before, _ = data.scan_folder(root, cache_file=scan)
    stat = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(raw)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after, _ = data.scan_folder(root, cache_file=scan)
    changed = {a.path for a, b in zip(after, before) if a.sha256 != b.sha256}
    assert changed == {str(target)}


def test_feature_cache_shards_shared_by_concurrent_caches_and_damage_recomputed(tmp_path, capsys):
    recs = [ImageRecord(f"{i}.png", "a", f"{i:02d}" * 32, "0" * 16, 4, 4, "PNG", "RGB") for i in range(4)]
    samples = [(r, "identity") for r in recs]

    def compute(chunk):
        return torch.stack([torch.full((2,), float(int(r.sha256[:2]))) for r, _ in chunk])

    one, two = FeatureCache(tmp_path, {"k": 1}), FeatureCache(tmp_path, {"k": 1})  # two trials at once
    assert one.fill(samples[:3], compute) == 3
    assert two.fill(samples[2:], compute) == 1  # sample 2 from the first trial's shard
    shards = sorted(one.dir.glob("shard-*.pt"))
    assert len(shards) == 2 and not list(one.dir.glob("*.tmp"))
    fresh = FeatureCache(tmp_path, {"k": 1})
    assert fresh.fill(samples, compute) == 0
    assert fresh.batch(samples)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # each found by its own hash and view
    (first,) = one.seen  # the first trial's shard: samples 0-2
    (one.dir / first).write_bytes(b"garbage")
    again = FeatureCache(tmp_path, {"k": 1})
    assert again.fill(samples, compute) == 3
    assert first in capsys.readouterr().err
    assert again.batch(samples)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert FeatureCache(tmp_path, {"k": 1}).fill(samples, compute) == 0  # rewritten whole


# ---------------------------------------------------------------------------------------------------
# File names that are not UTF-8, and atomic writes


def test_manifest_round_trips_a_non_utf8_file_name(tmp_path):
    root = png_folder(tmp_path / "set", per_class=5)
    odd = os.fsdecode(bytes(root / "pyrite") + b"/bad\xff name.png")
    make_image((9, 9, 9), seed=77).save(odd, format="PNG")
    records, _ = data.scan_folder(root)
    assert odd in {r.path for r in records}
    split = data.make_split(records, 231)
    manifest = tmp_path / "splits" / "m.csv"
    data.write_manifest(manifest, records, split, root)
    assert data.read_manifest(manifest, records, root) == split
    assert b"bad\xff name.png" in manifest.read_bytes()
    assert [p.name for p in manifest.parent.iterdir()] == ["m.csv"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "value.json"
    files.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["value.json"]


# ---------------------------------------------------------------------------------------------------
# Near-duplicate groups


def all_pairs_groups(records, max_distance: int = 6) -> np.ndarray:
    """The all-pairs version this project used before (n x n x 64 memory), kept as the reference."""
    import imagehash

    bits = np.array([imagehash.hex_to_hash(r.phash).hash.flatten() for r in records], dtype=np.uint8)
    same = (bits[:, None, :] != bits[None, :, :]).sum(-1) <= max_distance
    sha = np.array([r.sha256 for r in records])
    same |= sha[:, None] == sha[None, :]
    parent = np.arange(len(records))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(same, 1))):
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(records))])


def planted_hashes(n: int, rng: np.random.Generator, low_entropy: bool = False) -> list[int]:
    """Random 64-bit hashes with clusters and chains of near-duplicates 1-8 bits apart (so some pairs
    are just inside the distance, some just outside, some joined only transitively)."""
    mask = (1 << 64) - 1 if not low_entropy else int("0f" * 8, 16)  # fewer bits: crowded buckets
    hashes = []
    while len(hashes) < n:
        h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)) & mask
        hashes.append(h)
        for _ in range(int(rng.integers(0, 4))):
            for bit in rng.choice(64, int(rng.integers(1, 9)), replace=False):
                h ^= 1 << int(bit)
            hashes.append(h)
    order = rng.permutation(n)
    return [hashes[i] for i in order]


@pytest.mark.parametrize("low_entropy", [False, True])
def test_near_duplicate_groups_are_the_all_pairs_groups(low_entropy):
    rng = np.random.default_rng(5 + low_entropy)
    hashes = planted_hashes(700, rng, low_entropy)
    records = [ImageRecord(str(i), "a", f"{i:064x}", f"{h:016x}", 1, 1, "PNG", "RGB") for i, h in enumerate(hashes)]
    reference = all_pairs_groups(records)
    assert len(set(reference.tolist())) < len(records)  # there are groups to find
    assert np.array_equal(data.near_duplicate_groups(records), reference)
    assert np.array_equal(data.near_duplicate_groups(records, chunk=97), reference)  # many slices
    assert np.array_equal(data.near_duplicate_groups(records, max_distance=3), all_pairs_groups(records, 3))
