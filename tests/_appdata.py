"""Small app data for the app tests, made without the ML pipeline.

``make_app(root)`` lays out what ``explorer build IMAGES --app NAME`` would:

    root/images/<group>/<file>.jpg     originals (the image folder)
    root/NAME/                         copy of app_files/ (main.py, templates, static/css)
    root/NAME/static/thumbs/*.jpg      thumbnails
    root/NAME.csv                      the table (explorer.table schema + one extra column)
    root/NAME.run.json                 run record with "image_dir"

Points lie in four well separated groups (clusters 0-3, corners of a square) plus a
few noise points (cluster -1) in the middle; the ``label`` column holds text labels.
One image has a hostile file name that is also valid HTML.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from explorer.table import make_table, read_table, sidecar, write_json, write_table

REPO = Path(__file__).resolve().parents[1]
APP_FILES = REPO / "app_files"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_LABEL = "<b>bold</b>"
#: group centres (cluster id -> (x, y)) and their text labels
CENTRES = {0: (0.0, 0.0), 1: (10.0, 0.0), 2: (0.0, 10.0), 3: (10.0, 10.0)}
GROUP_NAMES = {0: "cat", 1: "coffee", 2: "astronaut", 3: "rocket", -1: "camera"}


def _source_images() -> dict[str, np.ndarray]:
    from skimage import data

    gray = data.camera()
    return {
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "camera": np.stack([gray] * 3, axis=-1),
    }


def make_app(
    root: str | Path,
    name: str = "app",
    per_group: int = 8,
    noise: int = 3,
    hostile: bool = True,
    seed: int = 0,
    features: bool = True,
) -> tuple[Path, Path]:
    """Create the app folder and CSV under ``root``; return (app_dir, csv_path).

    With ``features``, ``NAME.features.npy`` holds a float16 embedding per row: each group
    points along its own axis (noise images along a fifth), plus a little noise, so
    neighbours stay within a group."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    app_dir = root / name
    shutil.copytree(APP_FILES, app_dir, ignore=shutil.ignore_patterns("__pycache__", "exports"))
    thumbs = app_dir / "static" / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    sources = _source_images()

    paths, images, xy, cluster, label = [], [], [], [], []
    sizes = []
    groups = [(c, per_group) for c in CENTRES] + [(-1, noise)]
    for c, count in groups:
        group = GROUP_NAMES[c]
        src = sources[group]
        for i in range(count):
            fname = f"{group}_{i:03d}.jpg"
            if hostile and c == 0 and i == 0:
                fname = HOSTILE
            rel = f"{group}/{fname}"
            # a slightly different crop per image so originals differ
            h, w = src.shape[:2]
            dy, dx = int(rng.integers(0, h // 8)), int(rng.integers(0, w // 8))
            arr = src[dy : dy + h - h // 8, dx : dx + w - w // 8]
            img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
            img.thumbnail((160, 160))
            (images_dir / group).mkdir(parents=True, exist_ok=True)
            img.save(images_dir / rel, quality=85)
            thumb = img.copy()
            thumb.thumbnail((64, 64))
            thumb_name = f"{group}_{i:03d}_t.jpg" if fname != HOSTILE else fname
            thumb.save(thumbs / thumb_name, format="JPEG", quality=80)
            paths.append(rel)
            images.append(f"static/thumbs/{thumb_name}")
            if c >= 0:
                cx, cy = CENTRES[c]
                xy.append((cx + rng.normal(0, 0.6), cy + rng.normal(0, 0.6)))
            else:
                xy.append((5.0 + rng.normal(0, 0.3), 5.0 + rng.normal(0, 0.3)))
            cluster.append(c)
            label.append(HOSTILE_LABEL if (hostile and c == 0 and i == 1) else group)
            sizes.append(img.size)
    n = len(paths)
    df = make_table(
        paths,
        images,
        np.asarray(xy),
        np.asarray(cluster),
        probability=np.where(np.asarray(cluster) >= 0, 0.9, 0.0),
        outlier_score=rng.uniform(0, 1, n),
        width=[s[0] for s in sizes],
        height=[s[1] for s in sizes],
    )
    df["label"] = label
    df["photographer"] = [f"person {i % 3}" for i in range(n)]
    csv = root / f"{name}.csv"
    write_table(df, csv)
    write_json(sidecar(csv, "run.json"), {"image_dir": str(images_dir.resolve())})
    if features:
        np.save(sidecar(csv, "features.npy"), group_features(cluster, seed=seed))
    return app_dir, csv


def group_features(cluster, dim: int = 16, seed: int = 0) -> np.ndarray:
    """float16 embeddings: group ``c`` along axis ``c`` (noise -1 along axis 4), small noise."""
    rng = np.random.default_rng(seed + 1)
    cluster = np.asarray(cluster)
    X = rng.normal(0, 0.05, size=(len(cluster), dim))
    X[np.arange(len(cluster)), np.where(cluster >= 0, cluster, 4)] += 1.0
    return X.astype(np.float16)


def make_big_csv(root: str | Path, n: int, name: str = "big", seed: int = 0) -> tuple[Path, Path]:
    """An app with ``n`` points in 30 Gaussian blobs; all rows reuse 30 thumbnails."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    app_dir = root / name
    shutil.copytree(APP_FILES, app_dir, ignore=shutil.ignore_patterns("__pycache__", "exports"))
    thumbs = app_dir / "static" / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    sources = list(_source_images().values())
    k = 30
    for j in range(k):
        img = Image.fromarray(np.ascontiguousarray(sources[j % len(sources)])).convert("RGB")
        img.thumbnail((64, 64))
        img.save(thumbs / f"t{j:02d}.jpg", quality=80)
    centres = rng.uniform(-20, 20, size=(k, 2))
    cl = rng.integers(-1, k, size=n)
    xy = centres[np.maximum(cl, 0)] + rng.normal(0, 1.0, size=(n, 2))
    xy[cl < 0] = rng.uniform(-25, 25, size=(int((cl < 0).sum()), 2))
    df = make_table(
        [f"img/{i:07d}.jpg" for i in range(n)],
        [f"static/thumbs/t{i % k:02d}.jpg" for i in range(n)],
        xy,
        cl,
        probability=rng.uniform(0, 1, n),
        outlier_score=rng.uniform(0, 1, n),
        width=np.full(n, 640),
        height=np.full(n, 480),
    )
    csv = root / f"{name}.csv"
    write_table(df, csv)
    return app_dir, csv


def blob_features(csv: str | Path, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Write ``NAME.features.npy`` (float16) for :func:`make_big_csv`'s table: each row near
    its blob's random centre (noise rows near a centre of their own); returns the clusters."""
    cl = read_table(csv, strict=False)["cluster"].to_numpy()
    centres = rng.normal(size=(int(cl.max()) + 2, dim))
    F = centres[cl + 1] + rng.normal(0, 0.5, size=(len(cl), dim))
    np.save(sidecar(csv, "features.npy"), F.astype(np.float16))
    return cl


# --------------------------------------------------------------------------- Document helpers
def widget(doc, name):
    """The model called ``name`` in a Bokeh Document (fails the test if there is none)."""
    model = doc.select_one({"name": name})
    assert model is not None, f"no model named {name!r}"
    return model


def click(model):
    """Press a Bokeh Button as the browser would."""
    from bokeh.events import ButtonClick

    model._trigger_event(ButtonClick(model))


def plot_positions(doc, cluster):
    """Positions in the map's source of the rows of ``cluster``."""
    import numpy as np

    view = doc.explorer_view
    rows = np.flatnonzero(view.state.labels("cluster") == str(cluster))
    return np.searchsorted(view.plot_rows, rows).tolist()


def copy_app(app_dir: Path, csv: Path, dest: Path, sidecars=("run.json",)):
    """A private copy (exports write into it) of an app, its CSV and the CSV's sidecar files."""
    import shutil

    from explorer.table import sidecar

    shutil.copytree(app_dir, dest / app_dir.name)
    for f in [csv, *(sidecar(csv, kind) for kind in sidecars)]:
        shutil.copy(f, dest / f.name)
    return dest / app_dir.name, dest / csv.name


def app_document(app_dir: Path, *argv):
    """The app's Bokeh Document as ``bokeh serve APP --args ARGV...`` builds it for a session."""
    from bokeh.command.util import build_single_handler_application

    return build_single_handler_application(
        str(app_dir), argv=[str(a) for a in argv]).create_document()


def blank_labels(csv: Path) -> None:
    """Clear the CSV's label column: nobody has labelled anything yet."""
    df = read_table(csv)
    df["label"] = ""
    write_table(df, csv)


def served_on_ticks(view):
    """Make ``view`` behave as served: background work goes to the pools and its results
    come back as next-tick callbacks, which the returned ``drain(timeout=60)`` runs until
    no work is left (raises TimeoutError if some does not finish)."""
    ticks = []

    class Served:
        session_context = object()

        def add_next_tick_callback(self, cb):
            ticks.append(cb)

    view.doc = Served()

    def drain(timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while ticks:
                ticks.pop(0)()
            time.sleep(0.02)
            if not ticks and not view.busy and not view.image_map._running:
                return
        raise TimeoutError("background work did not finish")

    return drain
