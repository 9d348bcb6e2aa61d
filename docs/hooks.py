"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``).

- The benchmarks page is ``bench/README.md`` itself. The task pages link to
  ``../bench/README.md`` so that they read right in the repository; on the site that file becomes
  ``benchmarks.md`` (one source, no copy to keep in sync), the images it shows under
  ``bench/results/`` come along, and the links between it and the pages are rewritten both ways.
- The docstrings cite code with Sphinx roles (``:class:`~pkg.Name```), which the API pages would
  show as written: they become plain code (``~`` keeps the last name, as Sphinx shows it).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PAGE = "benchmarks.md"
IMAGE = re.compile(r"!\[[^\]]*\]\((results/[^)\s]+)\)")
ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def on_files(files, config):
    text = (BENCH / "README.md").read_text()
    files.append(File.generated(config, PAGE, content=text))
    for src in sorted(set(IMAGE.findall(text))):
        files.append(File.generated(config, src, abs_src_path=str(BENCH / src)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == PAGE:
        return markdown.replace("](../docs/", "](")
    return re.sub(r"\]\(\.\./bench/README\.md", f"]({PAGE}", markdown)


def on_page_content(html, page, config, files):
    def plain(match):
        name = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
        return f"<code>{name}</code>"

    return ROLE.sub(plain, html)
