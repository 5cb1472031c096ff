"""The Acme test backend: a third-party textgen backend plugin that computes on the host CPU."""
