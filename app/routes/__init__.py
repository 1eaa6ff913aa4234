"""One Litestar Controller per resource: chat, completions, models, tokenize, ops."""
