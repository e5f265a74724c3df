"""What the positional argument of `explorer build` is (folder, archive, table, URL
list, fsspec URL) and reading its items; the URL rules."""
