package goexec

import (
	"math"
	"runtime"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gopjrt/dtypes"
)

// unaryExecutor runs a float32 unary op through fn, in place where the input buffer is the
// executor's to reuse (as the stock unary ops do); other dtypes go to stockOp.
func unaryExecutor(fn func(in, out []float32), stockOp nodeExecutor) nodeExecutor {
	return func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
		shape := nodeShape(node)
		if !rowWiseOn.Load() || shape.DType != dtypes.Float32 {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		in, out := inputs[0], inputs[0]
		if inputsOwned[0] {
			inputs[0] = nil // the executor's protocol: the op took the buffer over
		} else if out = getBufferForShape(backend, shape); out == nil {
			return nil, errFinalized
		}
		fn(bufferFlat(in).([]float32), bufferFlat(out).([]float32))
		rowWiseCount.Add(1)
		return out, nil
	}
}

// unaryOps are the float32 unary ops with a faster executor: both spend their time in math.Exp
// (float64, about 10 ns a value) in the stock executors.
var unaryOps = map[backends.OpType]func(in, out []float32){
	backends.OpTypeExp:      exp32s,
	backends.OpTypeLogistic: logistic32s,
}

func exp32s(in, out []float32) { elementwise(in, out, exp32, exp32AVX2) }

func logistic32s(in, out []float32) { elementwise(in, out, logistic32, logistic32AVX2) }

// elementwise sets out[i] = fn(in[i]), four at a time through the AVX2 kernel where the CPU has
// it, split over the cores when there are many values.
func elementwise(in, out []float32, fn func(float32) float32, avx2 func(in, out *float32, blocks int)) {
	out = out[:len(in)]
	splitElements(len(in), func(lo, hi int) {
		if blocks := (hi - lo) / 4; hasAVX2 && blocks > 0 {
			avx2(&in[lo], &out[lo], blocks)
			lo += 4 * blocks
		}
		for i := lo; i < hi; i++ {
			out[i] = fn(in[i])
		}
	})
}

// minSplitElements is the size from which element-wise work is split over the cores: below it
// starting a goroutine costs more than it saves.
const minSplitElements = 1 << 16

// splitElements runs fn over [0, n), split over the cores when n is large. The graph's other
// ops may run concurrently: then the parts share the cores with them, which costs little.
func splitElements(n int, fn func(lo, hi int)) {
	if parts := runtime.GOMAXPROCS(0); parts > 1 && n >= minSplitElements {
		parallelFor(parts, n, fn)
		return
	}
	fn(0, n)
}

// exp32 is e^x for float32, within one unit in the last place of the correctly rounded value
// (see expReduced), with math.Exp's special cases: NaN stays NaN, overflow is +Inf, underflow
// 0 (denormal results are rounded as float32 rounds them).
func exp32(x float32) float32 {
	switch {
	case x != x:
		return x
	case x > 89:
		return float32(math.Inf(1))
	case x < -104:
		return 0
	}
	return float32(expReduced(float64(x)))
}

// logistic32 is 1/(1+e^−x) for float32, computed from e^−|x| in float64 as the stock executor
// does, so it neither overflows nor loses the small values of large negative x.
func logistic32(x float32) float32 {
	switch {
	case x != x:
		return x
	case x >= 104:
		return 1
	case x <= -104:
		return 0
	}
	xd := float64(x)
	if xd >= 0 {
		return float32(1 / (1 + expReduced(-xd)))
	}
	e := expReduced(xd)
	return float32(e / (1 + e))
}

// expReduced is e^x for x in [−104, 104]: x = n·ln2 + r with |r| ≤ ln2/2, and e^r by Cephes's
// single-precision minimax polynomial (expf.c: 1 + r + r²·P(r)), evaluated in float64, then
// scaled by 2ⁿ. The polynomial's error (about 2e-8 relative) keeps float32 results within one
// ulp of correct rounding (TestExp32 sweeps the range) at half the cost of a Taylor series.
func expReduced(x float64) float64 {
	const (
		log2e   = 1.4426950408889634
		ln2     = 0.6931471805599453
		shifter = 0x1.8p52 // adding it rounds to an integer, which its low bits then hold
	)
	t := x*log2e + shifter
	n := t - shifter
	r := x - n*ln2
	u := 1.9875691500e-4*r + 1.3981999507e-3
	u = u*r + 8.3334519073e-3
	u = u*r + 4.1665795894e-2
	u = u*r + 1.6666665459e-1
	u = u*r + 5.0000001201e-1
	scale := math.Float64frombits(uint64(int64(int32(uint32(math.Float64bits(t)))+1023)) << 52)
	return (u*r*r + r + 1) * scale
}
