#!/usr/bin/env python3
"""Validates rendered manifests offline (`make test` runs it through
system-tests/tests/kubernetes.rs):

    python3 deploy/kubernetes/validate.py RENDERED.yaml [...]

Kubernetes' own kinds against its published schemas (kubernetes-validate,
strict: unknown fields are errors); KEDA and Prometheus Operator kinds
against the openAPIV3Schema of their CRDs, vendored in crds/ with their
licences. Any other kind is an error. Prints one line per object; exits 1
if any is invalid."""
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.30.0"
HERE = pathlib.Path(__file__).resolve().parent


def strict(schema):
    """The schema with unknown fields refused wherever it lists the known
    ones, as `kubectl apply --validate=strict` does (the API server would
    silently drop them: a misspelt field is a setting that never applies)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas():
    """(apiVersion, kind) -> the CRD's JSON schema for that version."""
    schemas = {}
    for path in sorted((HERE / "crds").glob("*/*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def main(paths):
    schemas = crd_schemas()
    failures = 0
    for path in paths:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            name = f"{path}: {key[1]} {doc.get('metadata', {}).get('name')}"
            try:
                if key in schemas:
                    # Not jsonschema.validate: it first checks the schema
                    # against the JSON Schema meta-schema, and the CRDs'
                    # patterns are Go (RE2) syntax, which Python's `re`
                    # evaluates but the meta-schema's ECMA check refuses.
                    error = jsonschema.exceptions.best_match(
                        jsonschema.Draft7Validator(schemas[key]).iter_errors(doc)
                    )
                    if error is not None:
                        raise error
                else:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                print(f"valid   {name}")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures += 1
                message = getattr(e, "message", str(e)).splitlines()[0]
                print(f"INVALID {name}: {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
