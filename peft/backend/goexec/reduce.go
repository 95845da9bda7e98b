package goexec

import (
	"math"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gopjrt/dtypes"
)

// reduceOpTypes are the reductions with a row-wise path.
var reduceOpTypes = []backends.OpType{backends.OpTypeReduceSum, backends.OpTypeReduceMax}

// reduceExecutor runs a float32/float64 ReduceSum or ReduceMax whose reduced axes form one
// contiguous block (softmax's last axis, a broadcast's gradient over leading axes) as
// [outer, reduced, inner] rows (maxima bit for bit the stock ones; sums of a last axis with four
// running sums, so within rounding of the stock in-order sums); anything else goes to stockOp.
func reduceExecutor(isMax bool, stockOp nodeExecutor) nodeExecutor {
	return func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
		axes, ok := nodeData(node).([]int)
		inShape, outShape := bufferShape(inputs[0]), nodeShape(node)
		dtype := outShape.DType
		if !rowWiseOn.Load() || !ok || len(axes) == 0 || (dtype != dtypes.Float32 && dtype != dtypes.Float64) {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		outer, reduced, inner, ok := reduceBlock(inShape.Dimensions, axes)
		if !ok {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		out := getBufferForShape(backend, outShape)
		if out == nil {
			return nil, errFinalized
		}
		if dtype == dtypes.Float32 {
			reduceRows(isMax, outer, reduced, inner, bufferFlat(inputs[0]).([]float32), bufferFlat(out).([]float32), float32(-math.MaxFloat32))
		} else {
			reduceRows(isMax, outer, reduced, inner, bufferFlat(inputs[0]).([]float64), bufferFlat(out).([]float64), -math.MaxFloat64)
		}
		rowWiseCount.Add(1)
		return out, nil
	}
}

// reduceBlock views dims as [outer, reduced, inner] when the reduced axes (ignoring those of
// size 1) are consecutive.
func reduceBlock(dims, axes []int) (outer, reduced, inner int, ok bool) {
	isReduced := make([]bool, len(dims))
	for _, a := range axes {
		if a < 0 || a >= len(dims) {
			return 0, 0, 0, false
		}
		isReduced[a] = true
	}
	outer, reduced, inner = 1, 1, 1
	phase := 0 // 0 before the block, 1 inside, 2 after
	for a, d := range dims {
		if d == 1 {
			continue
		}
		switch {
		case isReduced[a] && phase == 2:
			return 0, 0, 0, false
		case isReduced[a]:
			phase = 1
			reduced *= d
		case phase == 0:
			outer *= d
		default:
			phase = 2
			inner *= d
		}
	}
	return outer, reduced, inner, true
}

// reduceRows sums (or takes the maximum, starting from lowest as GoMLX does) over the middle
// axis of in [outer, reduced, inner] into out [outer, inner].
func reduceRows[T float32 | float64](isMax bool, outer, reduced, inner int, in, out []T, lowest T) {
	for o := range outer {
		dst := out[o*inner : (o+1)*inner]
		src := in[o*reduced*inner : (o+1)*reduced*inner]
		if inner == 1 {
			if isMax {
				dst[0] = maxOf(src, lowest)
			} else {
				dst[0] = sumOf(src)
			}
			continue
		}
		init := T(0)
		if isMax {
			init = lowest
		}
		for i := range dst {
			dst[i] = init
		}
		for r := range reduced {
			row := src[r*inner : (r+1)*inner]
			if isMax {
				for i, v := range row {
					dst[i] = max(dst[i], v)
				}
			} else {
				for i, v := range row {
					dst[i] += v
				}
			}
		}
	}
}

// maxOf is max(lowest, src...) with four running maxima that the CPU overlaps. The builtin max
// propagates NaN as the stock executor's does, and is branch-free: on softmax rows a
// compare-and-branch version mispredicted and ran at half the speed.
func maxOf[T float32 | float64](src []T, lowest T) T {
	m0, m1, m2, m3 := lowest, lowest, lowest, lowest
	i := 0
	for ; i+4 <= len(src); i += 4 {
		m0, m1, m2, m3 = max(m0, src[i]), max(m1, src[i+1]), max(m2, src[i+2]), max(m3, src[i+3])
	}
	for ; i < len(src); i++ {
		m0 = max(m0, src[i])
	}
	return max(max(m0, m1), max(m2, m3))
}

// sumOf adds src with four running sums, which the CPU overlaps (one running sum waits for
// each addition); the result differs from the stock executor's in-order sum by rounding only.
func sumOf[T float32 | float64](src []T) T {
	var s0, s1, s2, s3 T
	i := 0
	for ; i+4 <= len(src); i += 4 {
		s0 += src[i]
		s1 += src[i+1]
		s2 += src[i+2]
		s3 += src[i+3]
	}
	for ; i < len(src); i++ {
		s0 += src[i]
	}
	return (s0 + s1) + (s2 + s3)
}
