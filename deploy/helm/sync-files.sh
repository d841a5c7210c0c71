#!/usr/bin/env bash
# Refreshes the chart's copies of the Grafana dashboard and the Prometheus rules (Helm's .Files reads only inside the chart; tests/deploy/chart.sh fails while they differ).
set -euo pipefail; cd "$(dirname "${BASH_SOURCE[0]}")/../.." && cp deploy/grafana/shoal.json deploy/helm/shoal/files/shoal.json && cp deploy/prometheus/shoal-rules.yml deploy/helm/shoal/files/shoal-rules.yml
