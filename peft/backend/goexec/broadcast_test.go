package goexec

import (
	"fmt"
	"math"
	"testing"

	"github.com/gomlx/gomlx/backends"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
)

// broadcastCases are operand shapes that broadcast against each other, among them those of
// softmax ([…, n] − […, 1]), RMSNorm (x·w[1,1,d]), rotary (x[b,s,h,d]·cos[b,s,1,d]) and the
// attention mask ([b,k,g,q,s] + [b,1,1,q,s]).
var broadcastCases = []struct {
	name     string
	lhs, rhs []int
}{
	{"softmax max", []int{2, 3, 2, 5, 7}, []int{2, 3, 2, 5, 1}},
	{"rmsnorm weight", []int{2, 5, 6}, []int{1, 1, 6}},
	{"rotary cos", []int{2, 5, 3, 4}, []int{2, 5, 1, 4}},
	{"mask bias", []int{2, 3, 2, 5, 5}, []int{2, 1, 1, 5, 5}},
	{"broadcast lhs", []int{1, 4}, []int{3, 4}},
	{"both sides", []int{3, 1}, []int{1, 4}},
	{"outer and inner", []int{1, 3, 1}, []int{2, 3, 4}},
	{"size-1 output axes", []int{1, 3, 1, 4}, []int{2, 3, 1, 1}},
	{"large", []int{4, 8, 33, 65}, []int{4, 8, 33, 1}},
}

// naiveBroadcast is the definition: out[i…] = lhs[i… with broadcast axes at 0] op rhs[…].
func naiveBroadcast(op binaryOp, lhsDims []int, lhs []float64, rhsDims []int, rhs []float64) ([]int, []float64) {
	rank := len(lhsDims)
	out := make([]int, rank)
	for i := range out {
		out[i] = max(lhsDims[i], rhsDims[i])
	}
	flat := func(dims, idx []int) int {
		f := 0
		for i, d := range dims {
			f = f*d + min(idx[i], d-1)
		}
		return f
	}
	vals := make([]float64, size(out))
	idx := make([]int, rank)
	for o := range vals {
		rem := o
		for i := rank - 1; i >= 0; i-- {
			idx[i] = rem % out[i]
			rem /= out[i]
		}
		vals[o] = apply(op, lhs[flat(lhsDims, idx)], rhs[flat(rhsDims, idx)])
	}
	return out, vals
}

func TestBroadcastOps(t *testing.T) {
	defer UninstallRowWise()
	backend := newBackend(t)
	ops := []struct {
		op binaryOp
		fn func(a, b *graph.Node) *graph.Node
	}{
		{opAdd, graph.Add}, {opSub, graph.Sub}, {opMul, graph.Mul}, {opDiv, graph.Div}, {opMax, graph.Max}, {opMin, graph.Min},
	}
	for _, c := range broadcastCases {
		for _, o := range ops {
			for _, dtype := range []dtypes.DType{dtypes.Float32, dtypes.Float64} {
				for _, swap := range []bool{false, true} {
					lhsDims, rhsDims := c.lhs, c.rhs
					if swap {
						lhsDims, rhsDims = rhsDims, lhsDims
					}
					name := fmt.Sprintf("%s/%s/%s/swap=%v", c.name, binaryOpTypes[o.op], dtype, swap)
					t.Run(name, func(t *testing.T) {
						l, r := values(size(lhsDims), 5), values(size(rhsDims), 6)
						for i := range r {
							r[i] += 3 // keep Div away from zero
						}
						_, want := naiveBroadcast(o.op, lhsDims, l, rhsDims, r)
						exec := func() []float64 {
							var lt, rt *tensors.Tensor
							if dtype == dtypes.Float32 {
								lt, rt = tensors.FromFlatDataAndDimensions(toFloat32(l), lhsDims...), tensors.FromFlatDataAndDimensions(toFloat32(r), rhsDims...)
							} else {
								lt, rt = tensors.FromFlatDataAndDimensions(l, lhsDims...), tensors.FromFlatDataAndDimensions(r, rhsDims...)
							}
							out := graph.MustNewExec(backend, o.fn).MustExec(lt, rt)[0]
							if dtype == dtypes.Float32 {
								return toFloat64(tensors.MustCopyFlatData[float32](out))
							}
							return tensors.MustCopyFlatData[float64](out)
						}
						stockVals, got, took := stockThenRowWise(t, exec)
						if took != 1 {
							t.Fatalf("the op did not take the row-wise path")
						}
						tol := 1e-12
						if dtype == dtypes.Float32 {
							tol = 1e-5
						}
						for i := range want {
							if math.Abs(got[i]-want[i]) > tol*math.Max(1, math.Abs(want[i])) || got[i] != stockVals[i] {
								t.Fatalf("value %d: row-wise %g, stock %g, definition %g", i, got[i], stockVals[i], want[i])
							}
						}
					})
				}
			}
		}
	}
}

// Same-shape and scalar operands stay on the stock path.
func TestBroadcastLeavesOtherShapes(t *testing.T) {
	defer UninstallRowWise()
	backend := newBackend(t)
	if err := InstallRowWise(); err != nil {
		t.Fatal(err)
	}
	before := RowWiseCount()
	x := tensors.FromFlatDataAndDimensions([]float32{1, 2, 3, 4}, 2, 2)
	graph.MustNewExec(backend, graph.Add).MustExec(x, x)
	graph.MustNewExec(backend, func(a *graph.Node) *graph.Node { return graph.AddScalar(a, 1) }).MustExec(x)
	if RowWiseCount() != before {
		t.Fatalf("same-shape or scalar ops took the broadcast path")
	}
}

// BroadcastInDim and Transpose only move values: the fast executors give the stock results bit
// for bit.
func TestLayoutOps(t *testing.T) {
	defer UninstallRowWise()
	backend := newBackend(t)
	for _, tc := range []struct {
		name string
		dims []int
		fn   func(x *graph.Node) *graph.Node
	}{
		{"broadcast mask bias", []int{2, 1, 1, 5, 5}, func(x *graph.Node) *graph.Node { return graph.BroadcastToDims(x, 2, 3, 2, 5, 5) }},
		{"broadcast last axis", []int{2, 3, 1}, func(x *graph.Node) *graph.Node { return graph.BroadcastToDims(x, 2, 3, 7) }},
		{"broadcast leading axes", []int{1, 1, 6}, func(x *graph.Node) *graph.Node { return graph.BroadcastToDims(x, 4, 5, 6) }},
		{"broadcast large", []int{8, 1, 1, 40, 40}, func(x *graph.Node) *graph.Node { return graph.BroadcastToDims(x, 8, 4, 2, 40, 40) }},
		{"transpose heads", []int{2, 5, 3, 2, 4}, func(x *graph.Node) *graph.Node { return graph.TransposeAllDims(x, 0, 2, 3, 1, 4) }},
		{"transpose back", []int{2, 3, 2, 5, 4}, func(x *graph.Node) *graph.Node { return graph.TransposeAllDims(x, 0, 3, 1, 2, 4) }},
		{"transpose matrix", []int{7, 9}, func(x *graph.Node) *graph.Node { return graph.TransposeAllDims(x, 1, 0) }},
		{"transpose reversed", []int{2, 3, 4, 5}, func(x *graph.Node) *graph.Node { return graph.TransposeAllDims(x, 3, 2, 1, 0) }},
	} {
		for _, dtype := range []dtypes.DType{dtypes.Float32, dtypes.Float64} {
			t.Run(fmt.Sprintf("%s/%s", tc.name, dtype), func(t *testing.T) {
				in := values(size(tc.dims), 4)
				want, got, took := stockThenRowWise(t, func() []float64 { return execOne(backend, tc.fn, dtype, in, tc.dims) })
				if took == 0 {
					t.Fatal("the op did not take the fast executor")
				}
				if len(got) != len(want) {
					t.Fatalf("%d values, stock %d", len(got), len(want))
				}
				for i := range want {
					if got[i] != want[i] {
						t.Fatalf("value %d: %g, stock %g", i, got[i], want[i])
					}
				}
			})
		}
	}
}

// stockThenRowWise runs exec with the row-wise executors off (the stock results), then on, and
// returns both results and how many ops took the row-wise paths in the second run.
func stockThenRowWise[T any](t *testing.T, exec func() []T) (stockVals, got []T, rowWise int64) {
	t.Helper()
	UninstallRowWise()
	stockVals = exec()
	if err := InstallRowWise(); err != nil {
		t.Fatal(err)
	}
	before := RowWiseCount()
	got = exec()
	return stockVals, got, RowWiseCount() - before
}

// execOne runs a one-input graph on values given in float64, as dtype (float32 or float64).
func execOne(backend backends.Backend, fn func(x *graph.Node) *graph.Node, dtype dtypes.DType, in []float64, dims []int) []float64 {
	if dtype == dtypes.Float32 {
		out := graph.MustNewExec(backend, fn).MustExec(tensors.FromFlatDataAndDimensions(toFloat32(in), dims...))[0]
		return toFloat64(tensors.MustCopyFlatData[float32](out))
	}
	out := graph.MustNewExec(backend, fn).MustExec(tensors.FromFlatDataAndDimensions(in, dims...))[0]
	return tensors.MustCopyFlatData[float64](out)
}
