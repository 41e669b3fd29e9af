"""Monitoring as code: the system alert rules and the Grafana dashboards, one source each, from
which ``python -m monitoring.generate`` writes the Prometheus rules file (compose, promtool), the
PrometheusRule (Kubernetes), promtool's unit tests, the dashboards' JSON and the rule table in
docs/alerts.md. Tests check the written files are the generator's output."""
