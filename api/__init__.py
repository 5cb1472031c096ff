"""textgen.api: the HTTP server (TGI and OpenAI routes), the gRPC service and the CLI."""
