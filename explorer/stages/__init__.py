"""The build's stages: pure functions (arrays in, arrays out) and the pipeline that
runs them (`explorer.build`); also the pure computations the app runs lazily over
the same arrays (neighbours, hierarchy)."""
