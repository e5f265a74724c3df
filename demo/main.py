"""Bokeh directory app: ``bokeh serve NAME --args NAME.csv`` (made by ``explorer build``)."""

import sys
from pathlib import Path

from bokeh.io import curdoc

from explorer.app import build_document

build_document(curdoc(), Path(__file__).resolve().parent, sys.argv[1:])
