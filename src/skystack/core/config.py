"""The workflow's config outside Snakemake: validated and defaulted from the same schema."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

#: The one config schema: every setting defined, documented, bounded and defaulted. It ships
#: inside the package, so the workflow and ``load_config`` find it however skystack is installed.
SCHEMA_PATH = Path(__file__).resolve().with_name("config.schema.yaml")


def _fill_defaults(schema: dict, value):
    """Fill in schema defaults, depth first (objects that default to {} get their own defaults)."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = yaml.safe_load(yaml.safe_dump(sub["default"]))  # a deep copy
        if key in value:
            value[key] = _fill_defaults(sub, value[key])
    return value


def _merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update`` recursively: mappings merge, anything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(*paths) -> dict:
    """Merge the YAML files in order (later wins, key by key at every depth, as Snakemake merges
    its ``configfile:`` and ``--configfile`` files), validate, fill defaults."""
    config: dict = {}
    for path in paths:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of settings")
        _merge(config, loaded)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(map(str, err.absolute_path)) or "(top level)"
        raise ValueError(f"{', '.join(map(str, paths))}: {where}: {err.message}") from None
    return _fill_defaults(schema, config)
