"""Extract the openAPIV3Schema of one served version from a CustomResourceDefinition YAML into the
JSON file deploy/schemas/ keeps, with `description` fields removed (they are most of the size and
do not take part in validation). Usage:

    python scripts/vendor_crd_schemas.py CRD.yaml VERSION OUT.json SOURCE
"""
from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    """Drop `description` annotations; a property that is itself named "description" is kept."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: strip_descriptions(prop) for name, prop in value.items()}
            else:
                out[key] = strip_descriptions(value)
        return out
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(crd_path: str, version: str, out_path: str, source: str) -> None:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]
    (entry,) = [v for v in spec["versions"] if v["name"] == version]
    schema = strip_descriptions(entry["schema"]["openAPIV3Schema"])
    schema["x-textgen-source"] = {"crd": crd["metadata"]["name"], "group": spec["group"], "version": version,
                                  "kind": spec["names"]["kind"], "from": source}
    with open(out_path, "w") as f:
        json.dump(schema, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
