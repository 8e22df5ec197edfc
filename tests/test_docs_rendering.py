"""The documentation's griffe extension (docs/_ext/sphinx_roles.py) and the built-site check
(docs/_ext/check_built_site.py), on the package's real docstrings; no site is built here
(``make test`` builds it and runs the check on the result)."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import griffe
import pytest

EXT = Path(__file__).resolve().parent.parent / "docs" / "_ext"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_ext_{name}", EXT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sphinx_roles = _load("sphinx_roles")
check_built_site = _load("check_built_site")


@pytest.fixture(scope="module")
def collection():
    loader = griffe.GriffeLoader(search_paths=[str(EXT.parent.parent)])
    loader.load("pyro_bqn")
    return loader.modules_collection


@pytest.fixture(scope="module")
def rendered():
    return sphinx_roles.rendered_identifiers()


def _convert(collection, rendered, path: str, text: str | None = None) -> str:
    obj = collection[path]
    return sphinx_roles.convert(text or obj.docstring.value, obj, collection, rendered)


def test_roles_become_links_to_rendered_objects(collection, rendered):
    text = _convert(collection, rendered, "pyro_bqn.nn.quantized_linear.QuantizedLinear")
    assert "[`Moments`][pyro_bqn.moments.Moments]" in text
    assert "[`propagate()`][pyro_bqn.nn.quantized_layer.propagate]" in text
    # `pyro_bqn.infer.predict` is a module and, at run time, the function it exports.
    assert "[`predict()`][pyro_bqn.infer.predict.predict]" in text
    assert ":class:`" not in text and ":func:`" not in text
    assert re.search(r"(?<!`)``(?!`)", text) is None  # double backticks, not a ``` fence


def test_external_and_unrendered_targets_become_code(collection, rendered):
    text = _convert(
        collection,
        rendered,
        "pyro_bqn.nn.quantized_linear.QuantizedLinear",
        ":class:`~pyro.nn.PyroModule`, :func:`torch.nn.functional.linear` and "
        ":func:`~pyro_bqn.nn.quantized_activation._formulas_forward`",
    )
    assert text == "`pyro.nn.PyroModule`, `torch.nn.functional.linear()` and `_formulas_forward()`"


def test_unresolved_reference_to_the_package_is_reported(collection, rendered, caplog):
    with caplog.at_level(logging.WARNING):
        text = _convert(
            collection, rendered, "pyro_bqn.levels", "see :func:`pyro_bqn.levels.no_such`"
        )
    assert text == "see `pyro_bqn.levels.no_such()`"
    assert "unresolved reference :func:`pyro_bqn.levels.no_such`" in caplog.text


def test_literal_blocks_maths_and_references(collection, rendered):
    text = _convert(collection, rendered, "pyro_bqn.nn.quantized_linear.QuantizedLinear")
    assert "Example:\n\n```pycon\n>>> import torch\n" in text
    assert "\n1. *Sampling-free learning of Bayesian quantized neural networks*, J. Su" in text
    assert "(ICLR 2020)\n2. *Discrete-valued" in text
    maths = _convert(collection, rendered, "pyro_bqn.nn.gaussian.gaussian_max")
    assert "$$\nE = \\mu_0 \\Phi(\\beta)" in maths and ".. math::" not in maths


def test_block_quote_becomes_a_fenced_block(collection, rendered):
    text = _convert(collection, rendered, "pyro_bqn.levels.LearnableLevels")
    assert "```text\nv_{k+1} = v_k + softplus(raw_gap_k) + min_gap * max(1, |v_k|),\n```" in text


def test_site_check_finds_raw_markup(tmp_path):
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text(
        "<p>A :class:<code>~pyro.nn.PyroModule</code> and ``x``; Usage::</p>", encoding="utf-8"
    )
    (tmp_path / "clean.html").write_text("<p><code>x</code></p>", encoding="utf-8")
    found = check_built_site.raw_markup(tmp_path)
    assert [line.split(": ")[1] for line in found] == [
        "Sphinx role",
        "double backticks",
        "double backticks",
        "literal-block marker",
    ]
    assert check_built_site.main([str(tmp_path)]) == 1


def test_double_backticks_may_wrap_a_line_but_not_a_paragraph(collection, rendered):
    text = "``a\nb`` and ``c``\n\n``d``"
    converted = _convert(collection, rendered, "pyro_bqn.levels", text)
    assert converted == "`a\nb` and `c`\n\n`d`"


def test_maths_in_a_list_item_is_indented_into_it(collection, rendered):
    text = _convert(collection, rendered, "pyro_bqn.nn.relu.ReLU")
    assert "\n\n    $$\n    E = \\mu\\Phi(a) + s\\phi(a)," in text


def test_site_check_finds_untypeset_maths(tmp_path):
    (tmp_path / "index.html").write_text("<p>$$ E = mc^2 $$</p>", encoding="utf-8")
    assert len(check_built_site.raw_markup(tmp_path)) == 2
