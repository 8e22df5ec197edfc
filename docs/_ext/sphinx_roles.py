"""Griffe extension: render the package's Sphinx-style docstrings with mkdocstrings.

The docstrings stay written for Sphinx (``:param:`` fields, ``:class:`` roles, ``::``
literal blocks, ``.. math::``). When griffe has loaded the package, this extension rewrites
each docstring's text to Markdown before the ``sphinx`` docstring parser reads its fields:

* ``:class:`~pyro_bqn.moments.Moments``` (and ``:func:``, ``:meth:``, ``:mod:``,
  ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``) becomes the cross-reference
  ``[`Moments`][pyro_bqn.moments.Moments]`` when the target is an object of this package,
  resolved in the docstring's scope the way Sphinx does (so ``mkdocs build --strict``
  fails on a reference that does not resolve to a rendered object), and inline code
  ``pyro.nn.PyroModule`` otherwise: the site is built offline, without Pyro's or
  PyTorch's Sphinx inventories, so external objects are named, not linked;
* ````code```` becomes ```code```;
* a paragraph ending in ``::`` (``Example::``, ``Usage::``) keeps its text with one colon
  and its indented block becomes a fenced code block (``pycon`` for doctests);
* ``.. math::`` blocks become display maths for ``pymdownx.arithmatex``;
* an indented block quote becomes a fenced block (formulas written in plain text);
* a class that assigns ``__doc__`` in its body gets that docstring (read at run time);
* a ``**References**`` list (``[1] title, authors`` with indented continuation lines)
  becomes a Markdown list.

Loaded by ``mkdocs.yml``: ``extensions: [docs/_ext/sphinx_roles.py]``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "pyro_bqn"
DOCS = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`([^`]+)`")
# An inline literal may wrap onto the next line, never across a blank one.
DOUBLE_BACKTICKS = re.compile(r"``((?:(?!\n[ \t]*\n).)+?)``", re.S)
EXPLICIT_TITLE = re.compile(r"^(.+?)\s*<([^<>]+)>$")
REFERENCE_ITEM = re.compile(r"^\[(\d+)\]\s+(.*)$")
CALLABLE_ROLES = {"func", "meth"}

_logger = griffe.get_logger("sphinx_roles")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, base: int) -> int:
    """Index one past the indented block that starts at or after ``start`` (blank lines
    inside it belong to it, trailing ones do not)."""
    end = last = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        if lines[end].strip():
            last = end + 1
        end += 1
    return last


def _fence(block: list[str], indent: int, language: str) -> list[str]:
    body = textwrap.dedent("\n".join(block)).strip("\n").splitlines()
    pad = " " * indent
    return [f"{pad}```{language}", *(pad + line if line else "" for line in body), f"{pad}```"]


def _block_indent(base: int) -> int:
    """Indentation of a block inside a paragraph indented by ``base``: a reST list item's
    body is indented by 2, but Markdown nests a block in a list item only at 4."""
    return 4 if 0 < base < 4 else base


def _language(block: list[str]) -> str:
    code = textwrap.dedent("\n".join(block)).strip()
    if code.startswith(">>>"):
        return "pycon"
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


def _starts_field_or_item(line: str) -> bool:
    stripped = line.lstrip()
    return stripped.startswith((":", "- ", "* ", "[")) or bool(re.match(r"\d+\.\s", stripped))


def _paragraph_start(lines: list[str], index: int) -> str:
    """The first line of the paragraph that holds ``lines[index]``."""
    while index > 0 and lines[index - 1].strip():
        index -= 1
    return lines[index]


def _convert_blocks(text: str) -> str:
    """Rewrite the reST block constructs (literal blocks, maths, block quotes, references)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        base = _indent(line)
        if stripped.startswith(".. math::"):
            end = _block_end(lines, i + 1, base)
            inline = stripped.removeprefix(".. math::").strip()
            body = textwrap.dedent("\n".join(lines[i + 1 : end])).strip("\n")
            pad = " " * _block_indent(base)
            rows = (inline + "\n" + body).strip().splitlines()
            out += ["", pad + "$$", *(pad + row for row in rows), pad + "$$", ""]
            i = end
            continue
        if stripped.endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            end = _block_end(lines, i + 1, base)
            if end > i + 1:
                head = stripped[:-2].rstrip()
                if head:
                    out.append(" " * base + head + ":")
                block = lines[i + 1 : end]
                out += ["", *_fence(block, _block_indent(base), _language(block))]
                i = end
                continue
        if stripped == "**References**":
            out += [line, ""]
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            while i < len(lines) and (match := REFERENCE_ITEM.match(lines[i].strip())):
                end = _block_end(lines, i + 1, base)
                rest = " ".join(row.strip() for row in lines[i + 1 : end] if row.strip())
                out.append(" " * base + f"{match[1]}. " + f"{match[2]} {rest}".strip())
                i = end
                while i < len(lines) and not lines[i].strip():
                    i += 1
            out.append("")
            continue
        previous = next((row for row in reversed(out) if row.strip()), "")
        if (
            stripped
            and out
            and not out[-1].strip()
            and previous
            and base > _indent(previous)
            and _indent(previous) == 0
            and not _starts_field_or_item(_paragraph_start(out, len(out) - 1 - 1))
            and not previous.rstrip().endswith("```")
        ):
            end = _block_end(lines, i, _indent(previous))
            block = [DOUBLE_BACKTICKS.sub(r"\1", row) for row in lines[i:end]]
            out += _fence(block, 0, "text")
            i = end
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _target_object(
    obj: griffe.Object, role: str, target: str, collection: Any
) -> griffe.Object | None:
    """The object ``target`` names in the scope of ``obj``, or ``None`` when it is not one
    of this package's objects (an external or unknown name). A function that shares its
    module's name (``pyro_bqn.infer.predict``) is found for ``:func:`` as at run time."""
    target = target.lstrip(".")
    head, _, tail = target.partition(".")
    if head == PACKAGE:
        path = target
    else:
        try:
            path = obj.resolve(head)
        except griffe.NameResolutionError:
            return None
        path = f"{path}.{tail}" if tail else path
    if not path.startswith(PACKAGE + ".") and path != PACKAGE:
        return None
    try:
        found = collection[path]
        found = found.final_target if found.is_alias else found
        if found.is_module and role != "mod" and found.name in found.members:
            found = found.members[found.name]
            found = found.final_target if found.is_alias else found
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return found


def rendered_identifiers(docs: Path = DOCS) -> set[str]:
    """The identifiers of the ``::: identifier`` blocks in the documentation's pages."""
    return {
        match[1]
        for page in docs.rglob("*.md")
        for match in re.finditer(r"^:::\s+(\S+)", page.read_text(encoding="utf-8"), re.M)
    }


def _lookup(collection: Any, path: str) -> griffe.Object | None:
    try:
        return collection[path]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _exported(target: griffe.Object, module: griffe.Object | None) -> bool:
    if module is None or module.is_alias or not module.is_module:
        return False
    member = module.members.get(target.name)
    try:
        return member is not None and member.is_alias and member.final_target is target
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def _is_rendered(target: griffe.Object, rendered: set[str], collection: Any) -> bool:
    """Whether mkdocstrings renders the object on some page: it has a docstring
    (``show_if_no_docstring`` is off), no private name on its path (the default filters),
    and it, an enclosing class, its module (when it is public there: ``__all__``) or a
    module that exports it is a ``:::`` block; a module only by its own block."""
    private = any(
        part.startswith("_") and not part.startswith("__") for part in target.path.split(".")
    )
    if target.docstring is None or private:
        return False
    if target.is_module:
        return target.path in rendered
    enclosing = target
    while not enclosing.parent.is_module:
        if enclosing.path in rendered:
            return True
        enclosing = enclosing.parent
    if enclosing.path in rendered or (enclosing.module.path in rendered and enclosing.is_public):
        return True
    return any(_exported(enclosing, _lookup(collection, identifier)) for identifier in rendered)


def _convert_roles(text: str, obj: griffe.Object, collection: Any, rendered: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        role, content = match[1], match[2].strip()
        titled = EXPLICIT_TITLE.match(content)
        if titled:
            title, target = titled[1], titled[2]
        else:
            short = content.startswith("~")
            target = content.lstrip("~")
            title = target.rsplit(".", 1)[-1] if short else target
            if role in CALLABLE_ROLES and not title.endswith(")"):
                title += "()"
        found = _target_object(obj, role, target, collection)
        if found is None or not _is_rendered(found, rendered, collection):
            if found is None and target.split(".")[0] == PACKAGE:
                _logger.warning(f"{obj.path}: unresolved reference {match[0]}")
            # External objects keep their full name: without an inventory it is the reader's
            # only way to find them.
            if found is None:
                title = target.lstrip(".") + ("()" if role in CALLABLE_ROLES else "")
            return f"`{title}`"
        return f"[`{title}`][{found.path}]"

    return ROLE.sub(replace, text)


def convert(text: str, obj: griffe.Object, collection: Any, rendered: set[str]) -> str:
    """The docstring ``text`` of ``obj`` rewritten from reST to Markdown (see the module)."""
    text = _convert_blocks(text)
    parts = re.split(
        r"(^\s*```[^\n]*\n.*?^\s*```$|^\s*\$\$\n.*?^\s*\$\$$)", text, flags=re.M | re.S
    )
    for index in range(0, len(parts), 2):
        parts[index] = DOUBLE_BACKTICKS.sub(
            r"`\1`", _convert_roles(parts[index], obj, collection, rendered)
        )
    return "".join(parts)


def _runtime_docstring(cls: griffe.Object) -> griffe.Docstring | None:
    """The docstring of a class that assigns ``__doc__`` in its body (built from a shared
    template), which static analysis cannot read: imported and read at run time."""
    value = getattr(importlib.import_module(cls.module.path), cls.name).__doc__
    return griffe.Docstring(inspect.cleandoc(value), parent=cls) if value else None


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded (see the module)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        self._visit(pkg, loader.modules_collection, rendered_identifiers(), set())

    def _visit(
        self, obj: griffe.Object, collection: Any, rendered: set[str], seen: set[str]
    ) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is None and obj.is_class and "__doc__" in obj.members:
            obj.docstring = _runtime_docstring(obj)
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, obj, collection, rendered)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, collection, rendered, seen)
