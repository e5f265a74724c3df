"""What acts on a finished build: search, the label journal and books, choosing
what to label next, near-duplicate grouping, exports, the treemap layout."""
