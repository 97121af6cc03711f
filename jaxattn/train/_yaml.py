"""The YAML dialect of config files: PyYAML's safe loader with YAML 1.2 floats (``1e-3`` is a
float), duplicate keys refused and merge keys (``<<: *defaults``) as the YAML merge type
defines them, and a dumper whose output that loader reads back."""

from __future__ import annotations

import re
import typing

import yaml

__all__ = ["YAMLError", "dump", "load", "scalar"]

YAMLError = yaml.YAMLError


class _Loader(yaml.SafeLoader):
    """safe_load, but ``1e-3`` is a float (YAML 1.2) rather than the string PyYAML makes."""


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as ``'1e-3'`` that ``_Loader`` would read back as floats."""


_MERGE = "tag:yaml.org,2002:merge"  # the key ``<<``
_VALUE = "tag:yaml.org,2002:value"  # the key ``=``, a plain string to the safe loader


def _merged(loader, value_node, deep) -> dict:
    """What ``<<: value`` brings in: a mapping, or a list of mappings of which the earlier
    win (https://yaml.org/type/merge.html; PyYAML 6.0.4 lets the later win for keys longer
    than a character, yaml/pyyaml#953, so the rule is applied here, not left to it)."""
    nodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
    merged: dict = {}
    for node in nodes:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"<< merges a mapping or a list of mappings, not a {node.id}",
                node.start_mark,
            )
        mapping = loader.construct_object(node, deep=deep)
        if not isinstance(mapping, dict):  # a !!set, say
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"<< merges a mapping, not a {node.tag.replace('tag:yaml.org,2002:', '!!')}",
                node.start_mark,
            )
        for key, value in mapping.items():
            merged.setdefault(key, value)
    return merged


def _mapping(loader, node, deep=False) -> dict:
    """A mapping, its ``<<`` merges first and its own keys over them. Built here rather than
    by PyYAML's ``flatten_mapping``, which rewrites the node in place: a mapping reused by
    an alias would then show the merged keys beside its own, as duplicates. Two equal keys
    in one mapping (``<<`` included) are refused: PyYAML keeps the last; in a config it is a
    mistake."""
    merged: dict = {}
    own: dict = {}
    lines: dict = {}
    for key_node, value_node in node.value:
        key = (
            key_node.value
            if key_node.tag in (_MERGE, _VALUE)
            else loader.construct_object(key_node, deep=deep)
        )
        if not isinstance(key, typing.Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a scalar, not a {key_node.id}", key_node.start_mark
            )
        if key in lines:
            several = "; merge several mappings with one: <<: [*a, *b]" if key == "<<" else ""
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {lines[key] + 1}){several}",
                key_node.start_mark,
            )
        lines[key] = key_node.start_mark.line
        if key_node.tag == _MERGE:
            merged = _merged(loader, value_node, deep)
        else:
            own[key] = loader.construct_object(value_node, deep=deep)
    return {**merged, **own}


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load(text: str):
    """The document in ``text`` (a SafeLoader subclass: no Python objects)."""
    return yaml.load(text, Loader=_Loader)


def dump(data) -> str:
    """``data`` (plain dicts, lists, scalars) as block YAML, keys in their order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def scalar(value) -> str:
    """A None or bool as YAML writes it (``null``, ``true``)."""
    return yaml.safe_dump(value).split("\n")[0]
