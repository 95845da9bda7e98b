//go:build !amd64 || purego

package goexec

// hasAVX2 is false off amd64 (or with the purego tag): the Go loops run.
const hasAVX2 = false

func exp32AVX2(in, out *float32, blocks int)      { panic("goexec: no AVX2 kernels in this build") }
func logistic32AVX2(in, out *float32, blocks int) { panic("goexec: no AVX2 kernels in this build") }
