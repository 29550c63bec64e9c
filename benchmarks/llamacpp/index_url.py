"""Where a file of a package lies on the package index pip is configured for.

    python3 benchmarks/llamacpp/index_url.py PROJECT FILENAME    # prints the file's URL

The index is pip's own choice: ``PIP_INDEX_URL``, else ``index-url`` in pip's configuration, else
pip's default. Its simple page for PROJECT (PEP 503) lists the project's files; the link named
FILENAME is printed, made absolute. The caller checks the file's SHA-256.
"""

from __future__ import annotations

import html.parser
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request


def index_url() -> str:
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    for scope in ("global", "user", "site"):
        r = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"{scope}.index-url"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    from pip._internal.models.index import PyPI  # pip's default, said by pip

    return PyPI.simple_url


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str] = {}
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links[data.strip()] = self._href
            self._href = None


def main(project: str, filename: str) -> str:
    page = urllib.parse.urljoin(index_url().rstrip("/") + "/", re.sub(r"[-_.]+", "-", project).lower() + "/")
    with urllib.request.urlopen(page, timeout=60) as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
    if filename not in parser.links:
        sys.exit(f"{filename} is not on {page}")
    return urllib.parse.urljoin(page, parser.links[filename]).split("#")[0]


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))
