//go:build tools

// Package helm pins the helm release that the end-to-end tests drive. It is its own module
// so that helm's Kubernetes libraries do not meet the control plane's replace lines.
package helm

import _ "helm.sh/helm/v3/cmd/helm"
