"""The HTTP layer: an OpenAI-compatible Litestar app over engine.client.AsyncEngineClient."""
