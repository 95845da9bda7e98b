//go:build amd64 && !purego

package goexec

import "golang.org/x/sys/cpu"

// hasAVX2 selects the AVX2 kernels of exp_amd64.s, which compute four values at a time with the
// same float64 operations as expReduced (so the same results as the Go code).
var hasAVX2 = cpu.X86.HasAVX2

//go:noescape
func exp32AVX2(in, out *float32, blocks int)

//go:noescape
func logistic32AVX2(in, out *float32, blocks int)
