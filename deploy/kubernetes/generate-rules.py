#!/usr/bin/env python3
"""Writes base/prometheus-rules.yaml from prometheus/rules/ (recording.yml,
then alerts.yml): the same groups, as a Prometheus Operator PrometheusRule."""
import pathlib

import yaml

root = pathlib.Path(__file__).resolve().parents[2]
groups = []
for name in ["recording.yml", "alerts.yml"]:
    groups += yaml.safe_load((root / "prometheus/rules" / name).read_text())["groups"]
doc = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "imgflow", "labels": {"release": "prometheus"}},
    "spec": {"groups": groups},
}
head = """# The recording rules and alerts of prometheus/rules/ (recording.yml, then
# alerts.yml), as a PrometheusRule. Generated; a test keeps the groups
# identical to those files. Regenerate with:
#   python3 deploy/kubernetes/generate-rules.py
"""
out = root / "deploy/kubernetes/base/prometheus-rules.yaml"
out.write_text(head + yaml.safe_dump(doc, sort_keys=False, width=100))
