"""Each page's scripts once: no inline script repeated.

sphinx-thebe and sphinx-togglebutton add their inline configuration scripts to every page, and
each reaches the page twice. An extension that calls ``app.add_js_file(None, body=...)`` after
the builder exists (sphinx-thebe does, in ``env-before-read-docs``) registers the script once
with the builder as filename ``None`` and once in the registry, which Sphinx 7.3 replays as
filename ``""``; the two never compare equal, so both are written. A repeated ``var`` is
harmless, but the repeated ``const THEBE_JS_URL = ...`` throws "Identifier 'THEBE_JS_URL' has
already been declared" in the console of every page. This local Sphinx extension keeps the
first of two scripts with the same source and attributes (no filename and an empty one are the
same source), late in ``html-page-context``, after the others have added theirs.
"""

from __future__ import annotations

from typing import Any


def _key(script: Any) -> tuple:
    """What makes two entries of ``script_files`` the same script (the priority does not)."""
    filename = getattr(script, "filename", script) or ""   # None and "" are an inline script
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def unique_scripts(app, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    kept = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
