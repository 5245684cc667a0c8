module github.com/vault-registrar/vault-registrar/tests/prometheus-operator

go 1.26.7

// Only downloaded, never built: the module carries the CustomResourceDefinitions of
// ServiceMonitor and PrometheusRule that the chart's monitoring objects must satisfy.
require github.com/prometheus-operator/prometheus-operator v0.85.0
