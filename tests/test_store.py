"""explorer.stages.store: vectors in one memory-mapped array file per model, an SQLite index."""

from __future__ import annotations

import numpy as np
import pytest

from explorer.stages.store import Store, StoreError


def test_put_read_roundtrip_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 4)).astype(np.float32)
    with Store(tmp_path / "s") as st:
        m = st.model_id("model-a")
        st.put(m, [f"h{i}" for i in range(6)], v)
        st.put(m, ["h2", "h9"], np.stack([v[0], v[5]]))  # h2 kept as it was, h9 added
        assert st.count(m) == 7 and st.dim(m) == 4
    with Store(tmp_path / "s") as st:
        m = st.model_id("model-a")
        rows = st.rows(m, ["h3", "nope", "h0", "h9", "h2"])
        assert (rows >= 0).tolist() == [True, False, True, True, True]
        got = st.read(m, rows[rows >= 0])
        np.testing.assert_array_equal(got, np.stack([v[3], v[0], v[5], v[2]]))
        with pytest.raises(ValueError, match="dimension"):
            st.put(m, ["z"], np.zeros((1, 5), np.float32))
        # another model key: nothing shared
        other = st.model_id("model-b")
        assert other != m and (st.rows(other, ["h0"]) < 0).all()


def test_the_array_file_grows_by_appending_only(tmp_path):
    with Store(tmp_path / "s") as st:
        m = st.model_id("k")
        st.put(m, ["a", "b"], np.ones((2, 3), np.float32))
        f = tmp_path / "s" / f"vectors-{m}.f32"
        before = f.read_bytes()
        st.put(m, ["c"], np.full((1, 3), 2, np.float32))
        after = f.read_bytes()
        assert after[: len(before)] == before and len(after) == len(before) + 12
        np.testing.assert_array_equal(st.read(m, st.rows(m, ["c", "a"])), [[2, 2, 2], [1, 1, 1]])


def test_an_uncommitted_write_leaves_no_wrong_vector(tmp_path):
    with Store(tmp_path / "s") as st:
        m = st.model_id("k")
        st.put(m, ["a"], np.ones((1, 2), np.float32))
        with pytest.raises(RuntimeError):
            with st.transaction():
                st.put(m, ["b"], np.full((1, 2), 7, np.float32))
                raise RuntimeError("crash before commit")
        assert st.rows(m, ["b"])[0] == -1
        st.put(m, ["c"], np.full((1, 2), 3, np.float32))  # overwrites the dropped bytes
        np.testing.assert_array_equal(st.read(m, st.rows(m, ["c", "a"])), [[3, 3], [1, 1]])


def test_alias_points_a_requested_key_at_the_used_one(tmp_path):
    with Store(tmp_path / "s") as st:
        used = st.alias("m|bfloat16", "m|float32")
        assert st.model_id("m|bfloat16") == used == st.model_id("m|float32")


def test_images_and_files(tmp_path):
    with Store(tmp_path / "s") as st:
        st.put_images(["a", "b"], [10, 20], [5, 6], [np.uint64(2**63 + 5), 7],
                      [np.arange(3, dtype=np.float32), np.ones(3, np.float32)], thumb=256)
        # in the order asked, repeats and unknown hashes included
        got = st.image_facts(["b", "c", "a", None, "a"], n_stats=3, thumb=256)
        assert got.found.tolist() == [True, False, True, False, True]
        assert got.complete.tolist() == [True, False, True, False, True]
        assert got.width.tolist() == [20, 0, 10, 0, 10]
        assert got.height.tolist() == [6, 0, 5, 0, 5]
        assert got.phash[2] == got.phash[4] == np.uint64(2**63 + 5) and got.phash[0] == 7
        assert got.stats[2].tolist() == [0, 1, 2] and got.stats[0].tolist() == [1, 1, 1]
        assert np.isnan(got.stats[1]).all() and got.stats.dtype == np.float32
        # another thumbnail size: sizes are kept, phash and stats are not reused
        other = st.image_facts(["a"], 3, thumb=128)
        assert other.found[0] and other.width[0] == 10
        assert not other.has_phash[0] and not other.has_stats[0] and not other.complete[0]
        # statistics of another length (an older STAT_NAMES) are not reused either
        assert not st.image_facts(["a"], 4).has_stats[0]


def test_lookups_span_many_query_chunks(tmp_path):
    # more hashes than one SQLite IN (...) chunk, in shuffled order, with repeats
    hs = [f"h{i}" for i in range(1300)]
    with Store(tmp_path / "s") as st:
        mid = st.model_id("m")
        st.put(mid, hs, np.arange(1300, dtype=np.float32)[:, None].repeat(2, 1))
        st.put_images(hs, range(1300), range(1300), range(1300), [None] * 1300, thumb=64)
        ask = hs[::-1] + ["nope"] + hs[:3]
        rows = st.rows(mid, ask)
        assert rows[:1300].tolist() == list(range(1299, -1, -1))
        assert rows[1300] == -1 and rows[1301:].tolist() == [0, 1, 2]
        f = st.image_facts(ask, 0)
        assert f.width[:1300].tolist() == list(range(1299, -1, -1)) and not f.found[1300]
        assert f.has_phash[:1300].all() and not f.has_stats.any()
        weird = "caf\udce9.jpg"  # a non-UTF-8 file name as Python surrogate-escapes it
        st.put_files([tmp_path / weird, tmp_path / "x.jpg"], [10, 20], [1, 2], ["a", "b"])
        assert st.known_hashes([tmp_path / weird, tmp_path / "x.jpg", tmp_path / "y.jpg"],
                               [10, 21, 5], [1, 2, 3]) == ["a", None, None]


def test_another_layout_version_is_refused(tmp_path):
    Store(tmp_path / "s").close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    db.execute("UPDATE meta SET value='99' WHERE key='version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="version 99"):
        Store(tmp_path / "s")
    with pytest.raises(ValueError, match="model key"):
        Store(tmp_path / "t").model_id("")


def test_read_gives_any_rows_in_any_order_across_runs(tmp_path):
    """Rows in any order, repeated, scattered and in runs longer than one read."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1300, 6)).astype(np.float32)
    with Store(tmp_path / "s.store") as st:
        mid = st.model_id("m")
        st.put(mid, [f"h{i}" for i in range(len(X))], X)
        for rows in (np.arange(1300)[::-1], rng.integers(0, 1300, 700), np.array([5, 5, 4, 6]),
                     np.r_[np.arange(100, 1200), 3, 1299]):
            np.testing.assert_array_equal(st.read(mid, rows), X[rows])
        with pytest.raises(StoreError, match="outside"):
            st.read(mid, np.array([1300]))
