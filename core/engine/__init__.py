"""The engine: model runner, the engine loop thread, the async front the HTTP layer uses."""
