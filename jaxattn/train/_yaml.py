"""The YAML dialect of config files: PyYAML's safe loader with YAML 1.2 floats (``1e-3`` is a
float) and duplicate keys refused, and a dumper whose output that loader reads back."""

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


def _mapping_without_duplicates(loader, node, deep=False):
    """PyYAML keeps the last of two equal keys; a config with both is a mistake."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        if isinstance(key, typing.Hashable):
            seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

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
