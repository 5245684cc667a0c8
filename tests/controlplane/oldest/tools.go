//go:build tools

// Package oldest pins the oldest Kubernetes release the chart admits (Chart.yaml's
// kubeVersion): its kube-apiserver and kube-controller-manager run the compatibility pass
// of `make test`. Nothing here is compiled into vault-registrar.
package oldest

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
