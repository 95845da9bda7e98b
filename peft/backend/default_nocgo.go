//go:build !cgo

package backend

// Without cgo gopjrt cannot be compiled, so only the pure-Go backend ("go") is
// registered; Choose then never proposes XLA.
import _ "github.com/gomlx/gomlx/backends/simplego"
