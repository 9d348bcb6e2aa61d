"""MkDocs hook: the benchmarks page of the site is ``bench/README.md`` itself.

The task pages link to ``../bench/README.md`` so that they read right in the repository; on the
site that file becomes ``benchmarks.md`` (one source, no copy to keep in sync), the images it
shows under ``bench/results/`` come along, and the links between it and the pages are rewritten
both ways.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PAGE = "benchmarks.md"
IMAGE = re.compile(r"!\[[^\]]*\]\((results/[^)\s]+)\)")


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
