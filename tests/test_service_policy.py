"""Who may use what in ``explorer serve``, and what stops one user from starving the others
(review 2026-12-06 N5, N6, N9, N12, N13, N15, N16). Unit tests without a server; the routes
are covered end to end at the bottom with one real ``explorer serve``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import jpeg_bytes, variant  # noqa: E402


# --------------------------------------------------------------------------- N16
def test_missing_txt_names_no_folder_of_the_server(tmp_path):
    from explorer.exports import plan_export

    root = tmp_path / "server" / "secret-place" / "images"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg_bytes(variant(0)))
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(variant(1)))
    os.symlink(tmp_path / "outside.jpg", root / "link.jpg")
    df = pd.DataFrame({"path": ["a.jpg", "gone.jpg", "link.jpg"], "cluster": [0, 0, 1]})
    note = plan_export(df, root, layout="cluster").refused_note().decode()
    assert "gone.jpg" in note and "link.jpg" in note and "outside the image folder" in note
    assert str(tmp_path) not in note and "secret-place" not in note


# --------------------------------------------------------------------------- N9: k_max
@pytest.mark.parametrize("method", ["kmeans", "agglomerative", "gmm", "auto"])
def test_k_max_above_the_limit_is_refused_naming_the_value(method):
    import numpy as np

    from explorer.cluster import K_MAX_LIMIT, cluster

    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k_max must be an integer in 2\.\.100; got 1000"):
        cluster(X, method, k_max=1000)
    assert K_MAX_LIMIT == 100
    if method == "kmeans":  # the limit itself is accepted (clamped to the distinct points)
        assert cluster(X[:5], method, k_max=K_MAX_LIMIT).labels is not None
