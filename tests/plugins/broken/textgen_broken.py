"""A backend plugin whose vendor SDK is missing: importing it fails, as a real one would."""
raise ImportError("acme SDK missing")
