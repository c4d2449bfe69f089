"""The workflow's config outside Snakemake: validated and defaulted from the same schema."""
from __future__ import annotations

import math
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


def non_finite_keys(value, where: str = "") -> list[str]:
    """Dotted keys (``search.snr_threshold``, ``deconvolve.kappa[1]``) of every NaN or infinite
    number: jsonschema lets NaN through any minimum/maximum, since NaN compares false."""
    if isinstance(value, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return [where] if isinstance(value, float) and not math.isfinite(value) else []
    return [bad for key, v in items for bad in non_finite_keys(v, key)]


def _read_yaml(path) -> dict:
    """One config file; a YAML syntax error names the file, line and column."""
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except yaml.MarkedYAMLError as err:
        mark, ctx = err.problem_mark, err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context} at line {ctx.line + 1}, column {ctx.column + 1})" if ctx and err.context else ""
        raise ValueError(f"{path}: {at}YAML syntax error: {err.problem}{context}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file must be a mapping of settings")
    return loaded


def load_config(*paths) -> dict:
    """Merge the YAML files in order (later wins, key by key at every depth, as Snakemake merges
    ``--configfile`` files), validate, fill defaults: the config the workflow runs with for
    ``snakemake --configfile PATHS...`` (nothing is merged under the files but the schema's
    defaults)."""
    config: dict = {}
    for path in paths:
        loaded = _read_yaml(path)
        bad = non_finite_keys(loaded)
        if bad:
            raise ValueError(f"{path}: {', '.join(bad)}: must be a finite number (not NaN or inf)")
        _merge(config, loaded)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in err.absolute_path).lstrip(".")
        where = where or "(top level)"
        raise ValueError(f"{', '.join(map(str, paths))}: {where}: {err.message}") from None
    return _fill_defaults(schema, config)


def main(argv=None) -> int:
    """``python -m skystack.core.config FILE...``: check config files as the workflow will
    (Snakemake's own loader names neither the file nor the line of a YAML syntax error)."""
    import sys

    try:
        load_config(*(argv if argv is not None else sys.argv[1:]))
    except (OSError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
