//go:build cgo

package backend

// With cgo, register GoMLX's default backends: pure Go ("go") and, unless built
// with -tags noxla, XLA/StableHLO through gopjrt ("xla", "stablehlo", …).
import _ "github.com/gomlx/gomlx/backends/default"
