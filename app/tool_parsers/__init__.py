"""Tool-call parsers: model text -> OpenAI tool_calls (only hermes, `--tool-call-parser hermes`)."""
