"""Third-party backend distributions used by the plugin tests (each folder has its own
pyproject.toml) and the fixture that installs them (`install.py`)."""
