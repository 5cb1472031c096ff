"""In-tree backends. Each sub-package is a pluggy plugin registered through the
`textgen.backends` entry point group, exactly like a third-party backend."""
