"""Applications built on the mintjax library (the library never imports them)."""
