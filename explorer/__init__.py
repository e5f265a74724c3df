"""bulk image explorer: see, group, clean and export a folder of images.

Stages are pure functions (arrays in, arrays out)::

    discover -> load -> embed -> reduce -> cluster -> table

Heavy dependencies (torch, timm, umap, hdbscan) are imported lazily inside the
functions that need them, so ``import explorer`` and the Bokeh app start fast.
"""

__version__ = "0.1.0"

from explorer.table import (  # noqa: F401
    COLUMNS,
    REQUIRED_COLUMNS,
    SchemaError,
    read_table,
    write_table,
)


def build(*args, **kwargs):
    """Run the whole pipeline; see :func:`explorer.stages.pipeline.build`."""
    from explorer.stages.pipeline import build as _build

    return _build(*args, **kwargs)


def open(csv_path):  # noqa: A001 - explorer.open("NAME.csv")
    """Open a build from its CSV: a :class:`explorer.dataset.Build` (table, run record,
    vectors, concepts, layout, labels and store paths)."""
    from explorer.dataset import open as _open

    return _open(csv_path)
