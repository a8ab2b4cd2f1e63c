"""Built-in recipes (YAML), installed as the package `diffq.recipes`."""
