package goexec

import (
	"fmt"
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gopjrt/dtypes"
)

// Maxima propagate NaN as the stock executor does, wherever it sits in the row.
func TestMaxOfNaN(t *testing.T) {
	for pos := range 7 {
		row := []float32{1, 5, 2, 8, 3, 0, 4}
		row[pos] = float32(math.NaN())
		if m := maxOf(row, -math.MaxFloat32); m == m {
			t.Errorf("NaN at %d: max %g", pos, m)
		}
	}
	if m := maxOf([]float32{1, 5, 2, 8, 3, 0, 4}, -math.MaxFloat32); m != 8 {
		t.Errorf("max %g, want 8", m)
	}
}

func TestReduceBlock(t *testing.T) {
	for _, tc := range []struct {
		dims, axes            []int
		outer, reduced, inner int
		ok                    bool
	}{
		{[]int{2, 3, 4}, []int{2}, 6, 4, 1, true},
		{[]int{2, 3, 4}, []int{0, 1}, 1, 6, 4, true},
		{[]int{2, 3, 4}, []int{1}, 2, 3, 4, true},
		{[]int{2, 1, 3, 4}, []int{0, 2}, 1, 6, 4, true}, // the size-1 axis between does not count
		{[]int{2, 3, 4}, []int{0, 2}, 0, 0, 0, false},
	} {
		o, r, i, ok := reduceBlock(tc.dims, tc.axes)
		if ok != tc.ok || (ok && (o != tc.outer || r != tc.reduced || i != tc.inner)) {
			t.Errorf("reduceBlock(%v, %v) = %d, %d, %d, %v; want %d, %d, %d, %v", tc.dims, tc.axes, o, r, i, ok, tc.outer, tc.reduced, tc.inner, tc.ok)
		}
	}
}

// naiveReduce is the definition: each output value reduces the input values whose indices
// agree with it off the reduced axes.
func naiveReduce(isMax bool, dims, axes []int, in []float64) []float64 {
	isReduced := make([]bool, len(dims))
	for _, a := range axes {
		isReduced[a] = true
	}
	outSize := 1
	for a, d := range dims {
		if !isReduced[a] {
			outSize *= d
		}
	}
	out := make([]float64, outSize)
	for i := range out {
		if isMax {
			out[i] = math.Inf(-1)
		}
	}
	idx := make([]int, len(dims))
	for f, v := range in {
		rem := f
		for a := len(dims) - 1; a >= 0; a-- {
			idx[a] = rem % dims[a]
			rem /= dims[a]
		}
		o := 0
		for a, d := range dims {
			if !isReduced[a] {
				o = o*d + idx[a]
			}
		}
		if isMax {
			out[o] = math.Max(out[o], v)
		} else {
			out[o] += v
		}
	}
	return out
}

func TestReduceRowWise(t *testing.T) {
	defer UninstallRowWise()
	backend := newBackend(t)
	for _, tc := range []struct {
		dims, axes []int
		rowWise    bool
	}{
		{[]int{2, 3, 2, 5, 7}, []int{4}, true},    // softmax
		{[]int{2, 5, 6}, []int{0, 1}, true},       // gradient of a [1,1,d] broadcast
		{[]int{2, 5, 3, 4}, []int{2}, true},       // gradient of rotary's [b,s,1,d]
		{[]int{2, 3, 2, 5, 5}, []int{1, 2}, true}, // gradient of the mask's [b,1,1,q,s]
		{[]int{4, 3, 5}, []int{0, 2}, false},      // not one block: stock
	} {
		for _, isMax := range []bool{false, true} {
			for _, dtype := range []dtypes.DType{dtypes.Float32, dtypes.Float64} {
				t.Run(fmt.Sprintf("%v/%v/max=%v/%s", tc.dims, tc.axes, isMax, dtype), func(t *testing.T) {
					in := values(size(tc.dims), 9)
					want := naiveReduce(isMax, tc.dims, tc.axes, in)
					fn := func(x *graph.Node) *graph.Node {
						if isMax {
							return graph.ReduceMax(x, tc.axes...)
						}
						return graph.ReduceSum(x, tc.axes...)
					}
					stockVals, got, n := stockThenRowWise(t, func() []float64 { return execOne(backend, fn, dtype, in, tc.dims) })
					if took := n != 0; took != tc.rowWise {
						t.Fatalf("row-wise path taken: %v, want %v", took, tc.rowWise)
					}
					tol := 1e-12 // four running sums round differently from one
					if dtype == dtypes.Float32 {
						tol = 1e-5
					}
					for i := range want {
						if (isMax && got[i] != stockVals[i]) || math.Abs(got[i]-stockVals[i]) > tol || math.Abs(got[i]-want[i]) > 1e-5 {
							t.Fatalf("value %d: row-wise %g, stock %g, definition %g", i, got[i], stockVals[i], want[i])
						}
					}
				})
			}
		}
	}
}
