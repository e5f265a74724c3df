"""End to end: `explorer build` on generated folders, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from explorer import table
from explorer.cli import main as cli
from tests._cpucheck import made_per_answer, run_answer

SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


def _source(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def make_folder(root: Path, per_source: int = 6, sources=SOURCES, seed: int = 0) -> list[Path]:
    """Families of crops/flips of a few sample photos, in subfolders, as JPEG and PNG."""
    rng = np.random.default_rng(seed)
    out = []
    for name in sources:
        src = _source(name)
        w, h = src.size
        for i in range(per_source):
            s = rng.uniform(0.6, 0.95)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = src.crop((x0, y0, x0 + cw, y0 + ch))
            if i % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.thumbnail((200, 200))
            p = root / name / f"img{i}.{'png' if i % 3 == 0 else 'jpg'}"
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p)
            out.append(p)
    return out


def _real_build(tmp_path_factory):
    """One real build (default model, real weights) of a folder with bad files among the photos."""
    base = tmp_path_factory.mktemp("e2e")
    imgs = base / "photos"
    make_folder(imgs)
    # bad files that must be skipped and listed, never stop the run
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "notes.txt").write_text("not an image, and not an image extension either")
    good = imgs / "astronaut" / "img1.jpg"
    (imgs / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    # two files called a.jpg in different folders, and a hostile name
    for sub in ["one", "two"]:
        (imgs / sub).mkdir()
        _source("coffee").resize((120, 80)).save(imgs / sub / "a.jpg")
    _source("chelsea").resize((90, 60)).save(imgs / "<img src=x onerror=alert(1)>.jpg")
    app = base / "photos_app"
    from explorer.stages.pipeline import build

    events = []
    build(imgs, app=app, progress=False, on_progress=events.append)
    return base, imgs, app, base / "photos_app.csv", events


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """``builds(answer)``: the real build made with the CPU check forced to ``answer`` ("0",
    "1"; ``None``: the run's own setting), made once per answer of the check."""
    return made_per_answer(lambda: _real_build(tmp_path_factory))


@pytest.fixture(scope="module")
def built(builds):
    """The real build shared by the checks below."""
    return builds(run_answer())


@pytest.mark.cpu_check
def test_build_writes_csv_app_thumbnails_and_run_record(builds, cpu_bf16):
    base, imgs, app, csv, _ = builds(cpu_bf16)
    df = table.read_table(csv)
    assert df.attrs["problems"] == []
    assert len(df) == 5 * 6 + 3  # every readable image, none of the bad files
    assert set(df["path"]).issuperset({"one/a.jpg", "two/a.jpg", "<img src=x onerror=alert(1)>.jpg"})
    # thumbnails: one per row, distinct, small, inside the app's static folder
    thumbs = [app / p for p in df["image"]]
    assert len(set(df["image"])) == len(df)
    assert all(t.is_file() and t.resolve().is_relative_to(app / "static") for t in thumbs)
    assert max(max(Image.open(t).size) for t in thumbs) <= 256
    # app folder is a Bokeh directory app
    assert (app / "main.py").is_file()
    # sizes are the originals', not the thumbnails'
    row = df.set_index("path").loc["one/a.jpg"]
    assert (row["width"], row["height"]) == (120, 80)
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["counts"]["rows"] == len(df) and run["counts"]["skipped"] == 3
    assert run["image_dir"] == str(imgs.resolve())
    assert "torch" in run["versions"] and "timm" in run["versions"]
    assert {"discover", "embed", "map", "cluster", "write"} <= set(run["timings"])
    ex = run["execution"]  # what was actually used
    assert ex["device"] == "cpu" and ex["engine"] == "local" and ex["batch_size"] == 8
    assert ex["precision"] in ("float32", "bfloat16") and ex["reproducible"] is False
    assert run["counts"]["recomputed"] == len(df) and run["counts"]["placed"] == 0
    feats = np.load(table.sidecar(csv, "features.npy"))
    assert feats.shape[0] == len(df)
    # concepts were computed in the embedding process from the store, a block at a time:
    # the same as from the vectors at once
    from explorer.stages import concepts as C

    idx, p = C.load_concepts(table.sidecar(csv, "concepts.npz"))
    assert idx.shape == (len(df), C.TOP_K)
    want_idx, _ = C.concepts_from_features(feats.astype(np.float32))
    assert (idx[:, 0] == want_idx[:, 0]).mean() >= 0.95  # features.npy is float16


def test_every_stage_reports_progress_events_the_embedding_process_too(built):
    """``build(on_progress=...)``: a start and an end (with seconds) for every stage of the
    run record's timings, and counts from the embedding child process (no Bar there could
    be seen before: it ran in another process)."""
    _, _, _, csv, events = built
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    stages = set(run["timings"]) - {"total"}
    ended = {e.stage: e.seconds for e in events if e.finished}
    assert set(ended) == stages
    for name in stages:
        assert ended[name] == pytest.approx(run["timings"][name], abs=0.01)
    counts = [(e.done, e.total) for e in events if e.stage == "embed" and e.total
              and not e.finished]
    assert counts and counts[-1][0] == counts[-1][1] >= len(table.read_table(csv))
    assert all(e.what == "Embedding" for e in events if e.stage == "embed" and e.total
               and not e.finished)


def test_concepts_in_blocks_equal_concepts_at_once():
    from explorer.stages import concepts as C
    from explorer.stages.pipeline import _concepts_of

    X = np.random.default_rng(0).normal(size=(70, 1280)).astype(np.float32)
    idx, p = _concepts_of((X[a:a + 16] for a in range(0, 70, 16)), 70, None, None)
    want_idx, want_p = C.concepts_from_features(X)
    assert np.array_equal(idx, want_idx) and np.allclose(p, want_p)
    assert _concepts_of(iter(()), 0, None, None) == "no vectors"


def test_bad_files_are_listed_with_reasons(built):
    _, _, _, csv, _ = built
    errs = pd.read_csv(table.sidecar(csv, "errors.csv"))
    assert set(errs["path"]) == {"broken.jpg", "empty.png", "truncated.jpg"}
    assert errs["reason"].str.len().min() > 3


def test_map_and_clusters_separate_the_photo_families(built):
    _, _, _, csv, _ = built
    df = table.read_table(csv)
    fam = df["path"].str.split("/").str[0]
    mask = fam.isin(SOURCES)
    assert np.isfinite(df[["x", "y"]].to_numpy()).all()
    # images of one source lie closer to each other than to other sources on the map
    xy = df.loc[mask, ["x", "y"]].to_numpy()
    f = fam[mask].to_numpy()
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = (f[:, None] == f[None]) & ~np.eye(len(f), dtype=bool)
    assert d[same].mean() < 0.5 * d[~(f[:, None] == f[None])].mean()
    assert df["probability"].between(0, 1).all() and df["outlier_score"].between(0, 1).all()


def test_rerun_decodes_nothing_seen_and_places_new_images_on_the_old_map(tmp_path, quick_build):
    """Own folder (not the shared fixture, section 8 #13): warm re-run, a few new images,
    then --remap. (The tiny model in this process: the test is about the store and the
    placement, not the weights.)"""
    from functools import partial

    from explorer.stages.pipeline import build

    build = partial(build, **quick_build)

    imgs = tmp_path / "photos"
    make_folder(imgs, per_source=8)  # 40 images
    app = tmp_path / "p"
    first = build(imgs, app=app, seed=3, progress=False)
    assert first.run["counts"]["decoded"] == 40
    # nothing changed: nothing decoded (L16), the same map, every row kept
    again = build(imgs, app=app, seed=3, progress=False)
    c = again.run["counts"]
    assert c["decoded"] == 0 and c["cached"] == 40 and c["placed"] == 0 and c["recomputed"] == 0
    pd.testing.assert_frame_equal(again.table, first.table)
    # two new crops of the coffee photo (5% new): placed, old rows keep their place
    src = _source("coffee")
    for k, box in enumerate([(20, 10, 380, 300), (60, 40, 400, 330)]):
        src.crop(box).resize((180, 145)).save(imgs / "coffee" / f"new{k}.jpg")
    placed = build(imgs, app=app, seed=3, progress=False)
    c = placed.run["counts"]
    assert c["placed"] == 2 and c["recomputed"] == 0 and c["decoded"] == 2
    old = first.table.set_index("path")
    new = placed.table.set_index("path")
    np.testing.assert_allclose(new.loc[old.index, ["x", "y"]], old[["x", "y"]])
    assert (new.loc[old.index, "cluster"] == old["cluster"]).all()
    fam = new.index.str.split("/").str[0]
    centre = {f: new.loc[(fam == f) & ~new.index.str.contains("new"), ["x", "y"]].mean()
              for f in SOURCES}
    for k in range(2):
        pos = new.loc[f"coffee/new{k}.jpg", ["x", "y"]]
        dist = {f: float(np.linalg.norm(pos - centre[f])) for f in SOURCES}
        assert min(dist, key=dist.get) == "coffee", dist
    assert any("placed 2 new" in n for n in placed.notes)
    # --remap recomputes everything
    remap = build(imgs, app=app, seed=3, remap=True, progress=False)
    assert remap.run["counts"]["recomputed"] == 42 and remap.run["counts"]["placed"] == 0


def test_file_replaced_in_place_gets_a_new_thumbnail(tmp_path):
    """Review M2: the thumbnail follows the file's content, not only its path."""
    from explorer.stages.pipeline import build

    imgs = tmp_path / "i"
    imgs.mkdir()
    _source("coffee").resize((120, 80)).save(imgs / "a.jpg")
    _source("astronaut").resize((100, 100)).save(imgs / "b.jpg")
    app = tmp_path / "t"
    one = build(imgs, app=app, method="phash", progress=False).table.set_index("path")
    Image.new("RGB", (120, 80), (250, 10, 10)).save(imgs / "a.jpg")  # now plain red
    two = build(imgs, app=app, method="phash", progress=False).table.set_index("path")
    assert two.loc["a.jpg", "image"] != one.loc["a.jpg", "image"]
    assert two.loc["b.jpg", "image"] == one.loc["b.jpg", "image"]
    r, g, b = np.asarray(Image.open(app / two.loc["a.jpg", "image"])).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_non_utf8_file_name_is_skipped_and_the_build_lands(tmp_path):
    """Review H3, through to the CSV (section 8 #12)."""
    import os
    from urllib.parse import unquote_to_bytes

    imgs = tmp_path / "n"
    make_folder(imgs, per_source=1, sources=SOURCES[:3])
    raw = os.fsencode(imgs) + b"/bad-\xff\xfe.jpg"
    with open(raw, "wb") as fh:
        fh.write((imgs / "chelsea" / "img0.png").read_bytes())
    csv = tmp_path / "n.csv"
    assert cli(["build", str(imgs), "--out", str(csv), "-q", "--method", "phash"]) == 0
    df = table.read_table(csv)
    assert len(df) == 3 and not df["path"].str.contains("bad").any()
    errs = pd.read_csv(table.sidecar(csv, "errors.csv"))
    assert len(errs) == 1 and "UTF-8" in errs["reason"][0]
    assert unquote_to_bytes(errs["path"][0]) == b"bad-\xff\xfe.jpg"  # lossless


def test_duplicates_are_grouped(tmp_path, quick_build):
    imgs = tmp_path / "dups"
    imgs.mkdir()
    src = _source("astronaut").resize((256, 256))
    src.save(imgs / "a.jpg", quality=95)
    src.save(imgs / "a_recompressed.jpg", quality=50)
    _source("coffee").resize((256, 170)).save(imgs / "b.jpg")
    _source("camera").resize((200, 200)).save(imgs / "c.png")
    from explorer.stages.pipeline import build

    df = build(imgs, out=tmp_path / "d.csv", progress=False, map_method="pca",
               **quick_build).table.set_index("path")
    g = df["duplicate_group"]
    assert g["a.jpg"] >= 0 and g["a.jpg"] == g["a_recompressed.jpg"]
    assert g["b.jpg"] == -1 and g["c.png"] == -1


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tiny_folders_still_give_a_valid_csv(tmp_path, n, quick_build):
    """Through the whole build (UMAP's own tiny-input fallbacks:
    test_reduce.py::test_map_and_space_tiny_inputs_never_crash)."""
    imgs = tmp_path / "tiny"
    make_folder(imgs, per_source=1, sources=SOURCES[:n])
    from explorer.stages.pipeline import build

    res = build(imgs, out=tmp_path / "t.csv", progress=False, map_method="pca", **quick_build)
    df = table.read_table(res.csv_path)
    assert len(df) == n and np.isfinite(df[["x", "y"]].to_numpy()).all()


def test_identical_images_give_a_valid_csv(tmp_path, quick_build):
    imgs = tmp_path / "same"
    imgs.mkdir()
    for i in range(6):
        _source("coins").save(imgs / f"c{i}.png")
    from explorer.stages.pipeline import build

    res = build(imgs, out=tmp_path / "t.csv", progress=False, map_method="pca", **quick_build)
    df = table.read_table(res.csv_path)
    assert len(df) == 6 and np.isfinite(df[["x", "y"]].to_numpy()).all()
    assert df["duplicate_group"].nunique() == 1 and df["duplicate_group"].iloc[0] >= 0


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli(["build", str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv"), "-q"])
    assert code == 1
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()


def test_folder_of_only_bad_files_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """... before the embedding process is started (it costs seconds to say nothing)."""
    import concurrent.futures

    def no_child(*a, **k):
        raise AssertionError("the embedding process was started for unreadable files")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_child)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.jpg").write_text("nope")
    (d / "y.png").write_bytes(b"")
    code = cli(["build", str(d), "--out", str(tmp_path / "b.csv"), "-q"])
    assert code == 1
    assert "could be read" in capsys.readouterr().err
    errs = pd.read_csv(table.sidecar(tmp_path / "b.csv", "errors.csv"))
    assert dict(zip(errs["path"], errs["reason"])) == {"x.jpg": "not an image",
                                                        "y.png": "empty file"}


def test_missing_folder_and_bad_options(tmp_path, capsys):
    assert cli(["build", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "i").mkdir()
    assert cli(["build", str(tmp_path / "i"), "--out", str(tmp_path / "x.txt")]) == 1
    assert ".csv" in capsys.readouterr().err
    assert cli(["build", str(tmp_path / "i")]) == 1
    assert "--app" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_builds_a_folder(tmp_path):
    """The installed `explorer` command runs a real (small, classic-method) build."""
    exe = Path(sys.executable).with_name("explorer")
    out = subprocess.run([str(exe), "build", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--device" in out.stdout and "--remap" in out.stdout
    imgs = tmp_path / "c"
    make_folder(imgs, per_source=2, sources=SOURCES[:2])
    out = subprocess.run([str(exe), "build", str(imgs), "--out", str(tmp_path / "c.csv"),
                          "--method", "phash", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(table.read_table(tmp_path / "c.csv")) == 4


def test_the_embedding_child_exits_when_the_build_is_killed(tmp_path):
    """The build embeds in a child process; a SIGKILLed build must not leave it embedding on
    for nobody (it did: an orphan kept both cores busy)."""
    import os
    import signal
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from explorer.stages.pipeline import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                             initializer=exit_with_parent, initargs=(os.getpid(),))\n"
        "    print(ex.submit(os.getpid).result(), flush=True)\n"
        "    ex.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


@pytest.mark.slow
def test_a_later_embedding_process_never_imports_torch(tmp_path):
    """After one run on this machine has exported the model to the user cache, the build's
    embedding process runs onnxruntime from the cache and reads the classifier from it:
    torch is never imported there (it alone costs ~600 MB of its memory). The CPU check is
    forced to "native bf16": "auto" keeps float32 + onnxruntime on such CPUs too."""
    import os

    imgs = tmp_path / "photos"
    make_folder(imgs, per_source=2)
    script = tmp_path / "job.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from explorer.stages.pipeline import _embed_job\n"
        "paths = sorted(p for p in Path(sys.argv[1]).rglob('*') if p.is_file())\n"
        "res = _embed_job(dict(paths=paths, model=None, checkpoint=None, store=sys.argv[2],\n"
        "                      progress=False, device='auto'), True)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'rt': res['model_info']['runtime'],\n"
        "                  'v': res['embeddings'][:, :8].tolist(),\n"
        "                  'top': res['concepts'][0][:, 0].tolist()}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "EXPLORER_CPU_BF16": "1"}

    def run(store):
        out = subprocess.run([sys.executable, str(script), str(imgs), str(tmp_path / store)],
                             capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run("a.store"), run("b.store")
    assert first["torch"] is True and first["rt"] == "onnxruntime"  # exported it
    assert second["torch"] is False and second["rt"] == "onnxruntime"
    np.testing.assert_allclose(second["v"], first["v"], rtol=1e-5, atol=1e-6)
    assert second["top"] == first["top"]  # the same ImageNet concepts
