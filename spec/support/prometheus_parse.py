"""Parses Prometheus text exposition from stdin with the official client's
parser (`pip install prometheus_client`) and prints the families as JSON:
{name: {"type": ..., "samples": [[sample_name, labels, value], ...]}}.
A text the parser rejects makes it exit non-zero with the parser's error."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(families))
