//go:build tools

// Package promtool pins the Prometheus release whose promtool checks the chart's alerting
// rules, runs their unit tests and lints the operator's /metrics. Its own module: Prometheus'
// dependencies would otherwise move the control plane's. Nothing here is compiled into
// vault-registrar.
package promtool

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
