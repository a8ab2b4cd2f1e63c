"""The package version, in a leaf module so that any layer can read it without a cycle."""
__version__ = "0.1.0"
# The PyPI name "diffq" is an unrelated project that installs the same import name; the CLI
# checks this marker to say so in one line when that package has replaced ours.
__distribution__ = "diffq-toolkit"
