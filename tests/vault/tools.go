//go:build tools

// Package vault pins the Vault release whose real binary the end-to-end tests run as a raft
// HA cluster. Nothing here is compiled into vault-registrar; build.sh builds the binary.
package vault

import (
	_ "github.com/hashicorp/vault"
)
