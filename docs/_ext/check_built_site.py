"""Fail when the built site shows reStructuredText that was meant to be rendered.

Run by ``make test`` after ``mkdocs build --strict``: ``python docs/_ext/check_built_site.py
site``. It reads every HTML page of the built site (not the search index) and reports each
raw Sphinx role (``:class:`` ...), double backtick, ``.. math::`` directive, literal-block
marker (a paragraph ending in ``::``), raw ``**References**`` heading or untypeset ``$$``
maths, with its page and context. The griffe extension ``docs/_ext/sphinx_roles.py`` is
what keeps this list empty.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RAW_PATTERNS = {
    "Sphinx role": re.compile(
        r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|math):(?:<code>|`)"
    ),
    "double backticks": re.compile(r"``"),
    "reST directive": re.compile(r"\.\. [a-z-]+::"),
    "literal-block marker": re.compile(r"::</p>"),
    "raw bold markup": re.compile(r"\*\*References\*\*"),
    # arithmatex turns $$...$$ into \[...\] for KaTeX; a $$ left in the page is untypeset.
    "untypeset maths": re.compile(r"\$\$"),
}


def raw_markup(site: Path) -> list[str]:
    """One line per raw construct found in the HTML pages under ``site``."""
    found = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        for kind, pattern in RAW_PATTERNS.items():
            for match in pattern.finditer(html):
                context = html[max(match.start() - 60, 0) : match.end() + 60].replace("\n", " ")
                found.append(f"{page.relative_to(site)}: {kind}: ...{context}...")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python docs/_ext/check_built_site.py SITE_DIR (a built mkdocs site)")
        return 2
    site = Path(argv[0])
    if not any(site.rglob("*.html")):
        print(f"{site} holds no HTML page: build the site first (mkdocs build)")
        return 2
    found = raw_markup(site)
    for line in found:
        print(line)
    pages = sum(1 for _ in site.rglob("*.html"))
    print(f"{len(found)} raw reStructuredText constructs in {pages} pages of {site}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
