"""Duplicates you can act on: scalable phash grouping (incremental), keep rules, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from explorer import table
from explorer.curation import dedupe
from explorer.stages import duplicates
from explorer.cli import main
from explorer.stages.similarity import components
from tests._imagegen import photo, save


# --------------------------------------------------------------------------- grouping
def planted(n_sources=200, n=1200, seed=0):
    """Hashes in families: random sources, members with up to 8 flipped bits, some copies."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 2**63, n_sources, dtype=np.uint64) * np.uint64(2)
    h = src[rng.integers(0, n_sources, n)].copy()
    for k in range(n):
        for b in rng.choice(64, rng.integers(0, 9), replace=False):
            h[k] ^= np.uint64(1) << np.uint64(b)
    return np.concatenate([h, h[:40]])  # exact copies too


def same_partition(a, b):
    """The same groups, whatever their ids (-1 = no group in both)."""
    a, b = np.asarray(a), np.asarray(b)
    if not np.array_equal(a < 0, b < 0):
        return False
    pairs = set(zip(a[a >= 0].tolist(), b[b >= 0].tolist()))
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def brute_groups(h, r):
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    a, b = np.nonzero(np.triu(d <= r, 1))
    return components(len(h), a, b)


@pytest.mark.parametrize("r", [0, 4, 8, 10, 12])
def test_groups_are_those_of_all_pairs(r):
    h = planted()
    got = duplicates.group_hashes(h, r)
    assert np.array_equal(got, brute_groups(h, r))
    assert (got >= 0).sum() > 40  # the check is not vacuous


def test_links_are_listed_once_and_within_the_radius():
    h = planted()
    i, j, _ = duplicates.hamming_links(h, 10)
    assert (j < i).all()
    assert (np.bitwise_count(h[i] ^ h[j]) <= 10).all()
    assert len(np.unique(i * len(h) + j)) == len(i)


def test_rerun_checks_only_the_new_images():
    h = planted(n=2000)
    keys = [f"img{k}.jpg" for k in range(len(h))]
    ix = duplicates.DuplicateIndex(10)
    first = ix.update(keys[:1500], h[:1500])
    assert np.array_equal(first, brute_groups(h[:1500], 10))  # from scratch: the same ids
    assert ix.n_queried > 1000
    lab = ix.update(keys, h)  # the first 1500 keys are known: only 540 are looked up
    assert ix.n_queried <= len(h) - 1500
    assert same_partition(lab, brute_groups(h, 10))
    ix.update(keys[:10], h[:10])
    assert ix.n_queried == 0


def test_index_survives_save_and_load(tmp_path):
    h = planted(n=500)
    keys = [f"k{k}" for k in range(len(h))]
    ix = duplicates.DuplicateIndex(8)
    ix.update(keys[:300], h[:300])
    ix.save(tmp_path / "ix.npz")
    back = duplicates.DuplicateIndex.load(tmp_path / "ix.npz")
    assert back.max_distance == 8 and back.keys == keys[:300]
    assert same_partition(back.update(keys, h), brute_groups(h, 8))
    assert back.n_queried <= len(h) - 300


def test_group_ids_stay_when_groups_grow_merge_and_split():
    """Known groups keep their ids; a merge keeps the smaller id; a new group gets a new id;
    forgetting the image that joined two others splits them as a fresh grouping would."""
    b = lambda bits: np.uint64(sum(1 << k for k in bits))  # noqa: E731
    c, t = list(range(20, 40)), list(range(44, 56))  # e = c + t: 12 bits from c
    h = np.array([b([]), b(range(0, 4)), b(c), b(c + [40]), b(c + t), b(c + t + [60])],
                 np.uint64)
    ix = duplicates.DuplicateIndex(8)
    lab = ix.update(["a", "a2", "c", "c2", "e", "e2"], h)
    assert lab.tolist() == [0, 0, 1, 1, 2, 2]
    # "x" lies within 8 bits of c's group and of e's group: they merge, keeping id 1
    x = b(c + t[:6])
    lab = ix.update(["a", "c", "e", "x"], np.array([h[0], h[2], h[4], x], np.uint64))
    assert ix.n_queried == 1
    assert lab.tolist() == [0, 1, 1, 1]
    new = ix.update(["n1", "n2"], np.array([b(range(0, 16)), b(range(0, 17))], np.uint64))
    assert new.tolist() == [3, 3]  # a new group: the next unused id
    assert ix.retain(["a", "a2", "c", "c2", "e", "e2", "n1", "n2"]) == 1  # x is gone
    assert ix.labels().tolist() == [0, 0, 1, 1, 4, 4, 3, 3]  # split: e's part gets a new id
    keys_now = ix.keys
    assert same_partition(ix.labels(), brute_groups(ix.hashes, 8)) and len(keys_now) == 8


def test_regroup_reuses_the_index_only_for_the_same_hashes():
    h = planted(n=300)
    keys = [f"k{k}" for k in range(len(h))]
    lab, ix = duplicates.regroup(None, keys[:200], h[:200], 10, source="phash:256")
    assert np.array_equal(lab, brute_groups(h[:200], 10))
    lab, ix2 = duplicates.regroup(ix, keys, h, 10, source="phash:256")
    assert ix2 is ix and ix.n_queried <= 100 and same_partition(lab, brute_groups(h, 10))
    lab, ix3 = duplicates.regroup(ix, keys, h, 10, source="bits:ssim")  # other hashes: anew
    assert ix3 is not ix and ix3.n_queried > 200
    lab, ix4 = duplicates.regroup(ix, keys, h, 20)  # beyond the index: all pairs, no index
    assert ix4 is None and np.array_equal(lab, brute_groups(h, 20))


def test_bad_radius_is_a_value_error():
    with pytest.raises(ValueError, match="max_distance"):
        duplicates.hamming_links(np.zeros(3, np.uint64), 40)


# --------------------------------------------------------------------------- keep rules
GROUP = np.array([0, 0, 0, -1, 1, 1])
FACTS = dict(width=[100, 300, 200, 50, 10, 10], height=[100, 300, 200, 50, 10, 10],
             sharpness=[5.0, 1.0, np.nan, 0, 2.0, 3.0],
             date=[300.0, np.nan, 100.0, 0, 50.0, 40.0],
             path=["a/long/name.jpg", "b.jpg", "cc.jpg", "x.jpg", "d/e.jpg", "d/f.jpg"])


@pytest.mark.parametrize("rule, kept", [
    ("largest", [1, 4]),      # 300x300; group 1 tie -> the earlier row
    ("sharpest", [0, 5]),     # NaN sharpness never wins
    ("earliest", [2, 5]),     # no date is never preferred
    ("shortest", [1, 4]),
    ("first", [0, 4]),
])
def test_each_rule_keeps_one_per_group(rule, kept):
    keep = dedupe.choose_keepers(GROUP, rule, **FACTS)
    assert sorted(np.flatnonzero(keep & (GROUP >= 0))) == kept
    assert keep[3]  # no group: kept


def test_override_wins_for_its_group_only():
    keep = dedupe.choose_keepers(GROUP, "largest", overrides={0: 2}, **FACTS)
    assert sorted(np.flatnonzero(keep & (GROUP >= 0))) == [2, 4]
    with pytest.raises(ValueError, match="not in group"):
        dedupe.choose_keepers(GROUP, "largest", overrides={1: 2}, **FACTS)
    with pytest.raises(ValueError, match="keep rule"):
        dedupe.choose_keepers(GROUP, "biggest", **FACTS)


def test_marks_follow_the_choice_and_clear_an_earlier_one():
    keep = dedupe.choose_keepers(GROUP, "first", **FACTS)
    cur = ["", "cat", dedupe.MARK, "", "", ""]
    ch = dedupe.mark_changes(FACTS["path"], GROUP, keep, cur)
    assert ch == {"b.jpg": dedupe.MARK, "d/f.jpg": dedupe.MARK}  # cc.jpg is marked already
    keep2 = dedupe.choose_keepers(GROUP, "earliest", **FACTS)  # now cc.jpg is kept
    assert dedupe.mark_changes(FACTS["path"], GROUP, keep2, cur)["cc.jpg"] == ""
    # ... and gets its own label back (the CSV's)
    orig = ["", "", "shoe", "", "", ""]
    assert dedupe.mark_changes(FACTS["path"], GROUP, keep2, cur, orig)["cc.jpg"] == "shoe"


def test_removal_table_lists_the_others_with_the_kept_path():
    keep = dedupe.choose_keepers(GROUP, "largest", **FACTS)
    t = dedupe.removal_table(FACTS["path"], GROUP, keep, "largest", width=FACTS["width"],
                             height=FACTS["height"], date=FACTS["date"])
    assert list(t.columns) == list(dedupe.REMOVAL_COLUMNS)
    assert t["path"].tolist() == ["a/long/name.jpg", "cc.jpg", "d/f.jpg"]
    assert t["kept_path"].tolist() == ["b.jpg", "b.jpg", "d/e.jpg"]
    assert t["exif_date"].iloc[1] == "1970-01-01 00:01:40"


def test_exif_date_is_read(tmp_path):
    img = Image.fromarray(photo("coffee"))
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x9003] = "2021:05:06 07:08:09"
    img.save(tmp_path / "dated.jpg", exif=ex)
    img.save(tmp_path / "plain.jpg")
    assert dedupe.format_date(dedupe.exif_date(tmp_path / "dated.jpg")) == "2021-05-06 07:08:09"
    assert np.isnan(dedupe.exif_date(tmp_path / "plain.jpg"))


# --------------------------------------------------------------------------- CLI
def dated(arr, path, when=None, quality=90):
    ex = Image.Exif()
    if when:
        ex.get_ifd(0x8769)[0x9003] = when
    save(arr, path, exif=ex, quality=quality)


@pytest.fixture()
def collection(tmp_path):
    """Two duplicate groups (a cat at three sizes, a coffee twice) and two unique photos."""
    root = tmp_path / "imgs"
    cat = photo("chelsea")
    small = np.asarray(Image.fromarray(cat).resize((cat.shape[1] // 2, cat.shape[0] // 2)))
    tiny = np.asarray(Image.fromarray(cat).resize((cat.shape[1] // 4, cat.shape[0] // 4)))
    rows = [("cats/big.jpg", cat, "2020:01:01 00:00:00", 0),
            ("cats/small.jpg", small, "2019:06:01 00:00:00", 0),
            ("t.jpg", tiny, None, 0),
            ("coffee/one.jpg", photo("coffee"), None, 1),
            ("coffee/copy-of-one.jpg", photo("coffee"), None, 1),
            ("rocket.jpg", photo("rocket"), None, -1),
            ("astronaut.jpg", photo("astronaut"), None, -1)]
    for rel, arr, when, _ in rows:
        dated(arr, root / rel, when)
    df = table.make_table([r[0] for r in rows], [f"static/t{k}.jpg" for k in range(len(rows))],
                          np.zeros((len(rows), 2)), np.zeros(len(rows), int), np.ones(len(rows)),
                          np.zeros(len(rows)), [r[1].shape[1] for r in rows],
                          [r[1].shape[0] for r in rows], duplicate_group=[r[3] for r in rows])
    csv = tmp_path / "col.csv"
    table.write_table(df, csv)
    return csv, root


def exported(csv, root, to):
    """The file names an export of the CSV writes (exports flatten the folders)."""
    assert main(["export", str(csv), "--images", str(root), "--to", str(to), "-q"]) == 0
    return sorted(str(p.relative_to(to)).split("/", 1)[1] for p in to.rglob("*.jpg"))


def test_dry_run_writes_the_removal_csv_and_changes_nothing(collection, tmp_path, capsys):
    csv, root = collection
    out = tmp_path / "removed.csv"
    assert main(["dedupe", str(csv), "--keep", "largest", "--images", str(root), "--dry-run",
                 "--csv", str(out)]) == 0
    t = pd.read_csv(out)
    assert sorted(t["path"]) == ["cats/small.jpg", "coffee/copy-of-one.jpg", "t.jpg"]
    assert set(t["kept_path"]) == {"cats/big.jpg", "coffee/one.jpg"}
    assert "3 images to remove" in capsys.readouterr().out
    assert not table.sidecar(csv, "labels.sqlite").exists()


def test_rules_pick_the_original(collection, tmp_path):
    csv, root = collection
    for rule, kept_cat in [("earliest", "cats/small.jpg"), ("shortest", "t.jpg"),
                           ("first", "cats/big.jpg"), ("sharpest", "t.jpg")]:
        out = tmp_path / f"{rule}.csv"
        assert main(["dedupe", str(csv), "--keep", rule, "--images", str(root), "--dry-run",
                     "--csv", str(out)]) == 0
        t = pd.read_csv(out)
        assert set(t.loc[t["group"] == 0, "kept_path"]) == {kept_cat}, rule


def test_mark_leaves_others_out_of_exports_and_undo_restores(collection, tmp_path):
    csv, root = collection
    before = exported(csv, root, tmp_path / "e0")
    assert len(before) == 7
    assert main(["dedupe", str(csv), "--keep", "largest", "--images", str(root),
                 "--override", "1=coffee/copy-of-one.jpg"]) == 0
    after = exported(csv, root, tmp_path / "e1")
    assert sorted(set(before) - set(after)) == ["one.jpg", "small.jpg", "t.jpg"]
    assert (root / "t.jpg").is_file()  # never deleted
    manifest = next(csv.parent.glob("col.dedupe-*.json"))
    assert main(["dedupe", "--undo", str(manifest)]) == 0
    assert exported(csv, root, tmp_path / "e2") == before


def test_a_second_rule_moves_the_marks_in_one_step(collection, tmp_path):
    csv, root = collection
    assert main(["dedupe", str(csv), "--keep", "largest", "--images", str(root)]) == 0
    assert main(["dedupe", str(csv), "--keep", "shortest", "--images", str(root)]) == 0
    kept = exported(csv, root, tmp_path / "e")
    assert "t.jpg" in kept and "big.jpg" not in kept and "small.jpg" not in kept
    # undoing the second run brings back the first run's choice
    second = sorted(csv.parent.glob("col.dedupe-*.json"))[-1]
    assert main(["dedupe", "--undo", str(second)]) == 0
    kept = exported(csv, root, tmp_path / "e2")
    assert "big.jpg" in kept and "t.jpg" not in kept


def test_move_to_and_undo_move_everything_back(collection, tmp_path, capsys):
    csv, root = collection
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    dest = tmp_path / "moved"
    assert main(["dedupe", str(csv), "--keep", "largest", "--images", str(root),
                 "--move-to", str(dest)]) == 0
    assert sorted(p.relative_to(dest) for p in dest.rglob("*.jpg")) == [
        Path("cats/small.jpg"), Path("coffee/copy-of-one.jpg"), Path("t.jpg")]
    assert not (root / "t.jpg").exists()
    manifest = next(dest.glob("dedupe-manifest-*.json"))
    assert len(json.loads(manifest.read_text())["moves"]) == 3
    assert main(["dedupe", "--undo", str(manifest)]) == 0
    assert sorted(p.relative_to(root) for p in root.rglob("*.jpg")) == files
    assert list(dest.rglob("*.jpg")) == []
    assert "moved 3 files back, took back 3 marks" in capsys.readouterr().out
    assert len(exported(csv, root, tmp_path / "e")) == 7


def test_bad_rule_and_bad_override_are_errors(collection, capsys):
    csv, root = collection
    assert main(["dedupe", str(csv), "--keep", "biggest", "--images", str(root)]) == 1
    assert "biggest" in capsys.readouterr().err
    assert main(["dedupe", str(csv), "--keep", "first", "--images", str(root),
                 "--override", "0=rocket.jpg"]) == 1
    assert "not in group 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- cnn+orb
def alike_vectors(n, cos=0.8, seed=0):
    """``n`` unit vectors whose every pair has the same cosine: they cannot tell copies
    from look-alikes, so only the ORB verification can."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(64, n + 1)))
    return (np.sqrt(cos) * q[:, :1] + np.sqrt(1 - cos) * q[:, 1:]).T.astype(np.float32)


def test_cnn_orb_links_only_pairs_that_share_keypoints(collection):
    csv, root = collection
    df = table.read_table(csv)
    paths = [root / p for p in df["path"]]
    v = alike_vectors(len(paths))
    lab, info = duplicates.group_cnn_orb(v, duplicates.orb_reader(paths))
    truth = df["duplicate_group"].to_numpy()
    assert info["candidates"] == 21  # every pair of the 7 is a candidate ...
    assert same_partition(lab, truth), lab  # ... only the copies share keypoints
    i, j, cos = duplicates.embedding_candidates(v, min_cosine=0.9)
    assert len(i) == 0  # below the cosine floor: not even a candidate
    with pytest.raises(ValueError, match="threshold"):
        duplicates.group_cnn_orb(v, duplicates.orb_reader(paths), threshold=1.5)


def test_cli_regroups_by_cnn_orb(collection, tmp_path, capsys):
    csv, root = collection
    df = table.read_table(csv)
    out = tmp_path / "removed.csv"
    args = ["dedupe", str(csv), "--keep", "largest", "--images", str(root), "--dry-run",
            "--method", "cnn+orb", "--csv", str(out)]
    assert main(args) == 1  # no vectors beside the CSV yet
    assert "features.npy" in capsys.readouterr().err
    np.save(table.sidecar(csv, "features.npy"), alike_vectors(len(df)).astype(np.float16))
    table.write_table(df.assign(duplicate_group=-1), csv)  # the build found no groups
    assert main(args) == 0
    t = pd.read_csv(out)
    assert sorted(t["path"]) == ["cats/small.jpg", "coffee/copy-of-one.jpg", "t.jpg"]
    assert "21 candidate pairs" in capsys.readouterr().out
    assert main(args[:-2] + ["--method", "cnn"]) == 1


def test_sharpness_many_is_sharpness_of_each_file_in_order(tmp_path):
    """Read on every core, the values come back in the files' order; a missing file or
    ``None`` is unknown (NaN), never an error."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        img = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        f = tmp_path / f"{i:02d}.png"
        img.filter(ImageFilter.GaussianBlur(i / 6)).save(f)
        files.append(f)
    files[5] = None
    files[9] = tmp_path / "missing.png"
    got = dedupe.sharpness_many(files)
    want = [dedupe.sharpness_of(f) if f is not None else np.nan for f in files]
    np.testing.assert_array_equal(got, np.asarray(want))
    assert np.isnan(got[[5, 9]]).all() and np.isfinite(np.delete(got, [5, 9])).all()
    assert got[0] > got[23]  # the sharp one above the blurred one
