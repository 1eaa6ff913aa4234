"""Bundled Jinja chat templates (data only): Qwen2-VL family, Qwen2.5-VL with tools and media, Qwen2.5 with
hermes tools, InternVL2.5.
A package so that a regular (non-editable) install ships them; read by app.chat_templates."""
