"""A small app as a build with concepts leaves it, for the Find tab's tests.

:func:`make_finder_app` is tests/_appdata.py's app (cats, coffee, astronauts, rockets and a
few grey camera photos) plus what a build adds: ``NAME.concepts.npz`` from the real default
backbone's view of the original images, ``cluster_name`` named from those concepts and the
folders (:func:`explorer.stages.concepts.name_clusters`), and quality-flag columns with a few set
(:data:`BLURRY`, :data:`DARK`; the camera photos ``grayscale``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import make_app  # noqa: E402

#: rows given a quality flag: cluster -> positions of its rows
BLURRY = {1: [0, 1, 2]}
DARK = {2: [0, 1]}


def make_finder_app(root: str | Path) -> tuple[Path, Path, dict[int, str]]:
    """(app folder, CSV, cluster id -> name) under ``root``."""
    from PIL import Image

    from explorer.stages import concepts as C
    from explorer.stages import embed
    from explorer.table import read_table, sidecar, write_table

    root = Path(root)
    app_dir, csv = make_app(root)
    df = read_table(csv)
    cluster = df["cluster"].to_numpy()
    for flag, where in (("blurry", BLURRY), ("dark", DARK)):
        col = np.zeros(len(df), dtype=int)
        for c, pos in where.items():
            col[np.flatnonzero(cluster == c)[pos]] = 1
        df[flag] = col
    df["grayscale"] = (cluster == -1).astype(int)
    model, cfg = embed.load_model()
    imgs = [Image.open(root / "images" / p).convert("RGB") for p in df["path"]]
    idx, p = C.concepts_from_features(embed.embed_images(imgs, model, cfg))
    C.save_concepts(sidecar(csv, "concepts.npz"), idx, p)
    names = C.name_clusters(cluster, idx, p, groups={"folder": C.folder_of(df["path"])})
    df["cluster_name"] = [names[c] for c in cluster]
    write_table(df, csv)
    return app_dir, csv, names
