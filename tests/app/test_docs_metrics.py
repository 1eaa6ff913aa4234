"""/docs renders offline (its HTML references only this server's paths, and they serve Swagger UI),
and /metrics sends one charset in its content type."""

import re

from prometheus_client import CONTENT_TYPE_LATEST


def test_docs_page_references_only_local_assets_and_they_are_served(make_client):
    client, _ = make_client()
    response = client.get("/docs")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", response.text)
    assert len(references) >= 4, references  # css, bundle js, standalone preset js, favicon
    for reference in references:
        assert reference.startswith("/") and not reference.startswith("//"), reference
        asset = client.get(reference)
        assert asset.status_code == 200 and len(asset.content) > 500, reference
    scripts = [r for r in references if r.endswith(".js")]
    assert any(b"SwaggerUIBundle" in client.get(script).content for script in scripts)
    assert "https://" not in response.text.split("spec:")[0]  # nothing before the inlined spec is remote


def test_metrics_content_type_has_one_charset(make_client):
    client, _ = make_client()
    content_type = client.get("/metrics").headers["content-type"]
    assert content_type.lower().count("charset") == 1, content_type
    assert content_type.replace(" ", "") == CONTENT_TYPE_LATEST.replace(" ", "")
