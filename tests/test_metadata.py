"""Reading per-image metadata, joining it by file name, and tag columns."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from explorer.stages.metadata import (
    MetadataTooLarge,
    join_metadata,
    normalize_key,
    looks_like_tags,
    read_metadata,
    rows_with_tag,
    split_tags,
    tag_values,
)
from explorer.table import read_table, write_table


def table(paths):
    n = len(paths)
    return pd.DataFrame({
        "path": paths, "image": [f"/t/{i}.jpg" for i in range(n)], "x": np.arange(n, dtype=float),
        "y": np.zeros(n), "cluster": [0] * n, "probability": [1.0] * n,
        "outlier_score": [0.0] * n, "width": [10] * n, "height": [10] * n, "label": [""] * n,
    })


# ------------------------------------------------------------------ reading
def test_read_csv_with_numbers_and_text(tmp_path):
    p = tmp_path / "meta.csv"
    p.write_text("file,iso,camera,tags\na.jpg,100,Nikon,#beach #sun\nb.jpg,200,Canon,\n",
                 encoding="utf-8")
    meta = read_metadata(p, "file")
    assert meta["file"].tolist() == ["a.jpg", "b.jpg"]
    assert meta["iso"].tolist() == [100, 200]  # numeric: can colour the map as numbers
    assert meta["camera"].tolist() == ["Nikon", "Canon"]
    assert meta.attrs["problems"] == []


def test_read_json_list_and_mapping_and_bytes(tmp_path):
    rows = [{"name": "a.jpg", "score": 0.5, "tags": ["x", "y"]}, {"name": "b.jpg", "score": 1}]
    p = tmp_path / "meta.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    meta = read_metadata(p, "name")
    assert meta["tags"].tolist()[0] == "x, y"  # JSON lists become a tag column
    assert meta["score"].tolist() == [0.5, 1.0]
    mapping = {"a.jpg": {"score": 3}, "sub/b.jpg": {"score": 4}}
    meta2 = read_metadata(json.dumps(mapping).encode(), "name")  # an upload: bytes
    assert meta2["name"].tolist() == ["a.jpg", "sub/b.jpg"] and meta2["score"].tolist() == [3, 4]


def test_read_bytes_csv_with_bom_and_windows_paths():
    data = "\ufefffile;place\r\n.\\x\\a.jpg;Paris\r\n".encode("utf-8")
    meta = read_metadata(data, "file")
    assert meta["file"].tolist() == ["x/a.jpg"] and meta["place"].tolist() == ["Paris"]


def test_missing_key_column_names_the_columns(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("filename,iso\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"no column 'file'.*'filename'"):
        read_metadata(p, "file")


def test_duplicates_are_reported_and_first_kept(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("file,v\na.jpg,1\na.jpg,2\n,3\nb.jpg,4\n")
    meta = read_metadata(p, "file")
    assert meta["file"].tolist() == ["a.jpg", "b.jpg"] and meta["v"].tolist() == [1, 4]
    text = " ".join(meta.attrs["problems"])
    assert "duplicate" in text and "a.jpg" in text and "without" in text


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        ("", ".csv", "empty"),
        ("{not json", ".json", "not valid JSON"),
        ('"just a string"', ".json", "list of objects"),
        ("[1, 2]", ".json", "not an object"),
        ('{"a.jpg": 5}', ".json", "maps to int"),
        ("file\n", ".csv", "no rows"),
    ],
)
def test_unreadable_metadata_gives_clear_errors(tmp_path, content, suffix, match):
    p = tmp_path / f"m{suffix}"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_metadata(p, "file")


def test_key_column_found_when_not_given(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("Filename,iso\na.jpg,1\n")
    meta = read_metadata(p, None)
    assert meta.attrs["key"] == "Filename"
    out, rep = join_metadata(table(["x/a.jpg"]), meta)
    assert out["iso"].tolist() == [1] and rep.to_dict()["matched"] == 1
    json_map = read_metadata(b'{"a.jpg": {"iso": 5}}', None)
    assert json_map.attrs["key"] == "file" and json_map["file"].tolist() == ["a.jpg"]
    (tmp_path / "n.csv").write_text("iso,camera\n1,x\n")
    with pytest.raises(ValueError, match="no file-name column"):
        read_metadata(tmp_path / "n.csv", None)


def test_missing_file_and_bad_argument(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_metadata(tmp_path / "nope.csv", "file")
    with pytest.raises(ValueError):
        read_metadata(123, "file")
    with pytest.raises(ValueError):
        read_metadata(b"file\na\n", "")


# ------------------------------------------------------------------ caps (H2)
HUGE_KEY = "d/" * (512 * 1024) + "x.jpg"  # a 1 MiB key of 512k folders


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_1mib_key_costs_bounded_memory_in_the_join():
    """H2: the old join indexed every suffix of every key (hundreds of GB for this key)."""
    df = table([f"d/d/x{i}.jpg" for i in range(300)] + ["d/d/x.jpg"])
    meta = pd.DataFrame({"file": [HUGE_KEY, "x3.jpg"], "place": ["deep", "Rome"]})
    (out, rep), peak = _peak(lambda: join_metadata(df, meta, "file"))
    assert peak < 50 * 2**20
    assert out["place"].iloc[-1] == "deep" and out["place"].iloc[3] == "Rome"
    assert (rep.matched, rep.by_suffix, rep.by_name) == (2, 1, 1)


def test_a_1mib_key_upload_is_refused_clearly_or_read_in_bounded_memory():
    data = ("file,place\n" + HUGE_KEY + ",deep\nd/y.jpg,near\n").encode()
    with pytest.raises(MetadataTooLarge, match="line is 1,048,5.. bytes long"):
        read_metadata(data, "file")  # the default line cap
    with pytest.raises(MetadataTooLarge, match="characters long, more than the limit of 8,192"):
        read_metadata(data, "file", max_line=4 << 20)  # the key cap
    # with both caps raised it is read and joined in bounded memory
    df = table(["d/d/x.jpg", "d/y.jpg"])

    def both():
        meta = read_metadata(data, "file", max_line=4 << 20, max_key=2 << 20)
        return join_metadata(df, meta)

    (out, rep), peak = _peak(both)
    assert peak < 50 * 2**20
    assert out["place"].tolist() == ["deep", "near"]


def test_uploads_and_files_are_capped_in_bytes_rows_and_lines(tmp_path):
    data = b"file,n\n" + b"".join(b"f%d.jpg,%d\n" % (i, i) for i in range(100))
    assert len(read_metadata(data, "file")) == 100
    with pytest.raises(MetadataTooLarge, match="upload is 1,... bytes, more than the limit of 1,000"):
        read_metadata(data, "file", max_bytes=1000)
    p = tmp_path / "m.csv"
    p.write_bytes(data)
    with pytest.raises(MetadataTooLarge, match="more than the limit of 1,000; not read"):
        read_metadata(p, "file", max_bytes=1000)
    with pytest.raises(MetadataTooLarge, match="100 rows, more than the limit of 99"):
        read_metadata(data, "file", max_rows=99)
    assert len(read_metadata(data, "file", max_rows=100)) == 100
    jl = b"".join(b'{"file": "f%d.jpg"}\n' % i for i in range(5))
    with pytest.raises(MetadataTooLarge, match="rows"):
        read_metadata(jl, "file", max_rows=3)
    js = json.dumps([{"file": f"f{i}.jpg"} for i in range(5)]).encode()  # one line: no line cap
    assert len(read_metadata(js, "file", max_line=10)) == 5
    with pytest.raises(MetadataTooLarge, match="rows"):
        read_metadata(js, "file", max_rows=3)
    with pytest.raises(ValueError, match="max_rows"):
        read_metadata(data, "file", max_rows=0)


def test_many_dot_slashes_normalise_in_linear_time():
    assert normalize_key("./" * 500_000 + "a.jpg") == "a.jpg"
    assert normalize_key(" ./.\\b/c.jpg ") == "b/c.jpg"


def test_quoted_fields_with_separators_and_newlines_still_parse():
    data = b'file,caption\n"a,1.jpg","two\nlines, and a comma"\nb.jpg,plain\n'
    meta = read_metadata(data, "file")
    assert meta["file"].tolist() == ["a,1.jpg", "b.jpg"]
    assert meta["caption"].tolist() == ["two\nlines, and a comma", "plain"]


# ------------------------------------------------------------------ joining
def test_join_by_path_suffix_and_name_never_drops_rows():
    df = table(["cats/a.jpg", "dogs/b.jpg", "dogs/c.jpg", "d.jpg", "nometa.jpg"])
    meta = pd.DataFrame({
        "file": ["cats/a.jpg", "/home/me/photos/dogs/b.jpg", "c.jpg", "d.jpg", "ghost.jpg"],
        "place": ["Rome", "Oslo", "Lima", "Pune", "Nowhere"],
        "iso": [100, 200, 300, 400, 500],
    })
    out, rep = join_metadata(df, meta, "file")
    assert len(out) == len(df) and out["path"].tolist() == df["path"].tolist()
    assert out["place"].tolist()[:4] == ["Rome", "Oslo", "Lima", "Pune"]
    assert pd.isna(out["place"].iloc[4]) and pd.isna(out["iso"].iloc[4])
    assert (rep.matched, rep.by_path, rep.by_suffix, rep.by_name) == (4, 2, 1, 1)
    assert rep.unmatched == 1 and rep.unmatched_examples == ["nometa.jpg"]
    assert rep.unused == 1 and rep.unused_examples == ["ghost.jpg"]
    assert "file" not in out.columns
    assert "matched 4 of 5" in rep.summary()
    assert "place" not in df.columns  # df untouched


def test_join_prefixes_clashing_columns():
    df = table(["a.jpg", "b.jpg"])
    df["place"] = ["here", "there"]
    meta = pd.DataFrame({"file": ["a.jpg"], "cluster": [9], "label": ["x"], "place": ["Rome"],
                         "path": ["elsewhere"]})
    out, rep = join_metadata(df, meta, "file")
    assert out["cluster"].tolist() == [0, 0] and out["label"].tolist() == ["", ""]
    assert out["place"].tolist() == ["here", "there"]
    assert out["meta_cluster"].iloc[0] == 9 and out["meta_place"].iloc[0] == "Rome"
    assert out["meta_path"].iloc[0] == "elsewhere"
    assert rep.renamed == {"cluster": "meta_cluster", "label": "meta_label",
                           "place": "meta_place", "path": "meta_path"}


def test_same_file_name_in_two_folders_is_reported():
    df = table(["train/a.jpg", "test/a.jpg"])
    meta = pd.DataFrame({"file": ["a.jpg"], "v": [1]})
    out, rep = join_metadata(df, meta, "file")
    assert out["v"].tolist() == [1, 1] and rep.ambiguous == 1
    # a full relative path disambiguates
    out2, rep2 = join_metadata(df, pd.DataFrame({"file": ["test/a.jpg"], "v": [2]}), "file")
    assert out2["v"].isna().tolist() == [True, False] and rep2.ambiguous == 0


def test_joined_table_round_trips_through_the_schema_writer(tmp_path):
    df = table(["a.jpg", "b.jpg"])
    out, _ = join_metadata(df, pd.DataFrame({"file": ["a.jpg"], "tags": ["#x #y"]}), "file")
    p = write_table(out, tmp_path / "t.csv")
    back = read_table(p)
    assert back["tags"].fillna("").tolist() == ["#x #y", ""]


# ------------------------------------------------------------------ tags
def test_split_tags_forms():
    assert split_tags("#beach #sunset") == ["beach", "sunset"]
    assert split_tags("beach, sunset ,beach") == ["beach", "sunset"]
    assert split_tags("#a,#b; c|d") == ["a", "b", "c", "d"]
    assert split_tags("  ") == [] and split_tags(None) == [] and split_tags(float("nan")) == []
    assert split_tags("solo") == ["solo"]
    assert split_tags(["#x", "y"]) == ["x", "y"]


def test_tag_values_counts_images_per_tag_and_rows_with_tag():
    s = pd.Series(["#beach #sun", "beach, city", None, "#sun #sun", "city"])
    assert tag_values(s) == {"beach": 2, "city": 2, "sun": 2}
    assert rows_with_tag(s, "sun").tolist() == [True, False, False, True, False]
    assert rows_with_tag(s, "#beach").tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        rows_with_tag(s, "  ")
    # cells of any kind: lists, missing values of every flavour, a pyarrow string column
    odd = pd.Series([["beach", "x"], float("nan"), "sun", pd.NA, ("sun",)], dtype=object)
    assert rows_with_tag(odd, "sun").tolist() == [False, False, True, False, True]
    arrow = pd.Series(["#a #b", None, "b; c", "#a #b"], dtype="string[pyarrow]")
    assert rows_with_tag(arrow, "b").tolist() == [True, False, True, True]
    assert not rows_with_tag(arrow, "<NA>").any()  # a missing cell has no tags


def test_looks_like_tags():
    assert looks_like_tags(pd.Series(["#a #b", "#c", "x"]))
    assert looks_like_tags(pd.Series(["a, b", "c, d"]))
    assert not looks_like_tags(pd.Series(["Nikon", "Canon"]))
    assert not looks_like_tags(pd.Series([1.0, 2.0]))
