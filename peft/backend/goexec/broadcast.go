package goexec

import (
	"errors"
	"sync/atomic"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gopjrt/dtypes"
)

// binaryOp is one of the binary ops with a row-wise broadcast path.
type binaryOp int

const (
	opAdd binaryOp = iota
	opSub
	opMul
	opDiv
	opMax
	opMin
	// opFirst copies its first operand: BroadcastInDim as a binary op whose second operand
	// is the first.
	opFirst
)

var binaryOpTypes = map[binaryOp]backends.OpType{
	opAdd: backends.OpTypeAdd, opSub: backends.OpTypeSub, opMul: backends.OpTypeMul,
	opDiv: backends.OpTypeDiv, opMax: backends.OpTypeMax, opMin: backends.OpTypeMin,
}

var (
	rowWiseInstalled bool
	rowWiseOn        atomic.Bool
	rowWiseCount     atomic.Int64
)

// InstallRowWise makes the pure-Go backend run two kinds of float32/float64 ops row by row,
// where simplego's stock executors compute every element's index with a multi-axis iterator
// (about six times slower than a plain loop):
//
//   - Add, Sub, Mul, Div, Max and Min whose operands differ in shape (implicit broadcasting, as
//     softmax, normalisations and rotary embeddings produce); same-shape and scalar operands
//     stay on the stock executors;
//   - ReduceSum and ReduceMax over one contiguous block of axes (softmax's last axis, the
//     gradient of a broadcast): maxima bit for bit the stock ones, sums within rounding;
//   - BroadcastInDim and Transpose (the layout ops of attention and of many gradients);
//   - and, not row-wise but as slow in the stock executors: float32 Exp and Logistic through a
//     float32 exponential within one ulp of the correctly rounded value (the stock executors
//     call float64 math.Exp, about 10 ns a value; softmax and SiLU spend their time there).
//
// Other dtypes and layouts stay on the stock executors. It also puts Install's DotGeneral
// executor in place, passing products to the stock kernels until Install gives it others, so
// that Counts sees every product. Like Install, it is process-wide and
// must run before the first graph executes; installing again turns it back on.
func InstallRowWise() error {
	installMu.Lock()
	defer installMu.Unlock()
	if err := prepare(); err != nil {
		return err
	}
	if rowWiseInstalled {
		rowWiseOn.Store(true)
		return nil
	}
	if err := installDotGeneral(); err != nil { // so that Counts sees every product
		return err
	}
	for _, opType := range []backends.OpType{backends.OpTypeBroadcastInDim, backends.OpTypeTranspose} {
		if nodeExecutors[opType] == nil {
			return errors.New("goexec: simplego has no " + opType.String() + " executor to replace")
		}
	}
	for opType := range unaryOps {
		if nodeExecutors[opType] == nil {
			return errors.New("goexec: simplego has no " + opType.String() + " executor to replace")
		}
	}
	for _, opType := range reduceOpTypes {
		if nodeExecutors[opType] == nil {
			return errors.New("goexec: simplego has no " + opType.String() + " executor to replace")
		}
	}
	for op, opType := range binaryOpTypes {
		stockOp := nodeExecutors[opType]
		if stockOp == nil {
			return errors.New("goexec: simplego has no " + opType.String() + " executor to replace")
		}
		nodeExecutors[opType] = broadcastExecutor(op, stockOp)
	}
	for opType, fn := range unaryOps {
		nodeExecutors[opType] = unaryExecutor(fn, nodeExecutors[opType])
	}
	nodeExecutors[backends.OpTypeBroadcastInDim] = broadcastInDimExecutor(nodeExecutors[backends.OpTypeBroadcastInDim])
	nodeExecutors[backends.OpTypeTranspose] = transposeExecutor(nodeExecutors[backends.OpTypeTranspose])
	for _, opType := range reduceOpTypes {
		nodeExecutors[opType] = reduceExecutor(opType == backends.OpTypeReduceMax, nodeExecutors[opType])
	}
	rowWiseInstalled = true
	rowWiseOn.Store(true)
	return nil
}

// UninstallRowWise returns the binary ops to the stock executors (the table entries stay ours
// and pass every op through).
func UninstallRowWise() { rowWiseOn.Store(false) }

// RowWiseCount returns how many ops have run on the row-wise paths.
func RowWiseCount() int64 { return rowWiseCount.Load() }

// broadcastInDimExecutor runs a float32/float64 BroadcastInDim as rows copied or filled.
func broadcastInDimExecutor(stockOp nodeExecutor) nodeExecutor {
	return func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
		outShape, inShape := nodeShape(node), bufferShape(inputs[0])
		axes, ok := nodeData(node).([]int)
		dtype := outShape.DType
		if !rowWiseOn.Load() || !ok || len(axes) != inShape.Rank() || inShape.Size() == 1 || (dtype != dtypes.Float32 && dtype != dtypes.Float64) {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		// The operand's dimensions placed on the output axes, 1 elsewhere (as the stock op does).
		placed := make([]int, outShape.Rank())
		for i := range placed {
			placed[i] = 1
		}
		for operandAxis, outAxis := range axes {
			if outAxis < 0 || outAxis >= len(placed) {
				return stockOp(backend, node, inputs, inputsOwned)
			}
			placed[outAxis] = inShape.Dimensions[operandAxis]
		}
		out := getBufferForShape(backend, outShape)
		if out == nil {
			return nil, errFinalized
		}
		plan := planBroadcast(outShape.Dimensions, placed, placed)
		if dtype == dtypes.Float32 {
			in := bufferFlat(inputs[0]).([]float32)
			broadcastRows(opFirst, plan, bufferFlat(out).([]float32), in, in)
		} else {
			in := bufferFlat(inputs[0]).([]float64)
			broadcastRows(opFirst, plan, bufferFlat(out).([]float64), in, in)
		}
		rowWiseCount.Add(1)
		return out, nil
	}
}

// transposeExecutor runs a float32/float64 Transpose row by row (transpose in gemm.go).
func transposeExecutor(stockOp nodeExecutor) nodeExecutor {
	return func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
		outShape, inShape := nodeShape(node), bufferShape(inputs[0])
		perm, ok := nodeData(node).([]int)
		dtype := outShape.DType
		if !rowWiseOn.Load() || !ok || len(perm) != inShape.Rank() || (dtype != dtypes.Float32 && dtype != dtypes.Float64) {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		out := getBufferForShape(backend, outShape)
		if out == nil {
			return nil, errFinalized
		}
		if dtype == dtypes.Float32 {
			transpose(bufferFlat(out).([]float32), bufferFlat(inputs[0]).([]float32), inShape.Dimensions, perm)
		} else {
			transpose(bufferFlat(out).([]float64), bufferFlat(inputs[0]).([]float64), inShape.Dimensions, perm)
		}
		rowWiseCount.Add(1)
		return out, nil
	}
}

func broadcastExecutor(op binaryOp, stockOp nodeExecutor) nodeExecutor {
	return func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
		outShape := nodeShape(node)
		lhsShape, rhsShape := bufferShape(inputs[0]), bufferShape(inputs[1])
		dtype := outShape.DType
		if !rowWiseOn.Load() || (dtype != dtypes.Float32 && dtype != dtypes.Float64) || lhsShape.Rank() != outShape.Rank() || rhsShape.Rank() != outShape.Rank() ||
			lhsShape.Size() == 1 || rhsShape.Size() == 1 || lhsShape.Equal(rhsShape) {
			return stockOp(backend, node, inputs, inputsOwned)
		}
		// Reuse an operand's buffer for the output where the stock ops would: each output value
		// depends on that operand's value at the same index only, read before it is written.
		var out *simplego.Buffer
		switch {
		case inputsOwned[1] && rhsShape.Equal(outShape):
			out, inputs[1] = inputs[1], nil
		case inputsOwned[0] && lhsShape.Equal(outShape):
			out, inputs[0] = inputs[0], nil
		default:
			out = getBufferForShape(backend, outShape)
			if out == nil {
				return nil, errFinalized
			}
		}
		lhs, rhs := inputs[0], inputs[1]
		if lhs == nil {
			lhs = out
		}
		if rhs == nil {
			rhs = out
		}
		plan := planBroadcast(outShape.Dimensions, lhsShape.Dimensions, rhsShape.Dimensions)
		if dtype == dtypes.Float32 {
			broadcastRows(op, plan, bufferFlat(out).([]float32), bufferFlat(lhs).([]float32), bufferFlat(rhs).([]float32))
		} else {
			broadcastRows(op, plan, bufferFlat(out).([]float64), bufferFlat(lhs).([]float64), bufferFlat(rhs).([]float64))
		}
		rowWiseCount.Add(1)
		return out, nil
	}
}

// broadcastPlan is the output's axes with size-1 axes dropped and neighbours merged where both
// operands step through them contiguously, with each operand's stride per axis (0 where it is
// broadcast). The last axis's strides are 0 or 1.
type broadcastPlan struct {
	dims, lhsStrides, rhsStrides []int
}

func planBroadcast(out, lhs, rhs []int) broadcastPlan {
	strides := func(d []int) []int {
		s := make([]int, len(d))
		for stride, i := 1, len(d)-1; i >= 0; i-- {
			if d[i] != 1 {
				s[i] = stride
			}
			stride *= d[i]
		}
		return s
	}
	ls, rs := strides(lhs), strides(rhs)
	var p broadcastPlan
	for i := len(out) - 1; i >= 0; i-- {
		if out[i] == 1 {
			continue
		}
		if n := len(p.dims); n > 0 {
			// Merge axis i into the next kept axis when both operands continue contiguously.
			j := n - 1
			if ls[i] == p.lhsStrides[j]*p.dims[j] && rs[i] == p.rhsStrides[j]*p.dims[j] {
				p.dims[j] *= out[i]
				continue
			}
		}
		p.dims = append(p.dims, out[i])
		p.lhsStrides = append(p.lhsStrides, ls[i])
		p.rhsStrides = append(p.rhsStrides, rs[i])
	}
	// Built innermost first: reverse to row-major order.
	for _, s := range [][]int{p.dims, p.lhsStrides, p.rhsStrides} {
		for i, j := 0, len(s)-1; i < j; i, j = i+1, j-1 {
			s[i], s[j] = s[j], s[i]
		}
	}
	return p
}

// broadcastRows computes out = lhs op rhs following plan, one innermost row at a time. (Split
// over the cores these memory-bound loops measured no faster: waking a second core costs as
// much as it saves.)
func broadcastRows[T float32 | float64](op binaryOp, p broadcastPlan, out, lhs, rhs []T) {
	rank := len(p.dims)
	if rank == 0 {
		out[0] = apply(op, lhs[0], rhs[0])
		return
	}
	broadcastRowRange(op, p, out, lhs, rhs, 0, len(out)/p.dims[rank-1])
}

// broadcastRowRange computes the rows [lo, hi) of broadcastRows.
func broadcastRowRange[T float32 | float64](op binaryOp, p broadcastPlan, out, lhs, rhs []T, lo, hi int) {
	rank := len(p.dims)
	n, ls, rs := p.dims[rank-1], p.lhsStrides[rank-1], p.rhsStrides[rank-1]
	// The outer indices of row lo, and the operands' offsets there.
	idx := make([]int, rank)
	li, ri := 0, 0
	for ax, rem := rank-2, lo; ax >= 0; ax-- {
		idx[ax] = rem % p.dims[ax]
		rem /= p.dims[ax]
		li += idx[ax] * p.lhsStrides[ax]
		ri += idx[ax] * p.rhsStrides[ax]
	}
	for o := lo * n; o < hi*n; o += n {
		row(op, out[o:o+n], lhs[li:], ls, rhs[ri:], rs)
		for ax := rank - 2; ax >= 0; ax-- {
			idx[ax]++
			li += p.lhsStrides[ax]
			ri += p.rhsStrides[ax]
			if idx[ax] < p.dims[ax] {
				break
			}
			li -= p.lhsStrides[ax] * p.dims[ax]
			ri -= p.rhsStrides[ax] * p.dims[ax]
			idx[ax] = 0
		}
	}
}

func apply[T float32 | float64](op binaryOp, a, b T) T {
	switch op {
	case opAdd:
		return a + b
	case opSub:
		return a - b
	case opMul:
		return a * b
	case opDiv:
		return a / b
	case opMax:
		return max(a, b)
	case opMin:
		return min(a, b)
	default:
		return a
	}
}

// row computes one output row; a stride of 0 repeats that operand's first value. The loops
// are written out per op so that each compiles to a tight loop.
func row[T float32 | float64](op binaryOp, out, a []T, as int, b []T, bs int) {
	n := len(out)
	switch {
	case as == 1 && bs == 1:
		a, b = a[:n], b[:n]
		switch op {
		case opAdd:
			for i := range out {
				out[i] = a[i] + b[i]
			}
		case opSub:
			for i := range out {
				out[i] = a[i] - b[i]
			}
		case opMul:
			for i := range out {
				out[i] = a[i] * b[i]
			}
		case opDiv:
			for i := range out {
				out[i] = a[i] / b[i]
			}
		case opMax:
			for i := range out {
				out[i] = max(a[i], b[i])
			}
		case opMin:
			for i := range out {
				out[i] = min(a[i], b[i])
			}
		default:
			copy(out, a)
		}
	case as == 1:
		a, c := a[:n], b[0]
		switch op {
		case opAdd:
			for i := range out {
				out[i] = a[i] + c
			}
		case opSub:
			for i := range out {
				out[i] = a[i] - c
			}
		case opMul:
			for i := range out {
				out[i] = a[i] * c
			}
		case opDiv:
			for i := range out {
				out[i] = a[i] / c
			}
		case opMax:
			for i := range out {
				out[i] = max(a[i], c)
			}
		case opMin:
			for i := range out {
				out[i] = min(a[i], c)
			}
		default:
			copy(out, a)
		}
	case bs == 1:
		c, b := a[0], b[:n]
		switch op {
		case opAdd:
			for i := range out {
				out[i] = c + b[i]
			}
		case opSub:
			for i := range out {
				out[i] = c - b[i]
			}
		case opMul:
			for i := range out {
				out[i] = c * b[i]
			}
		case opDiv:
			for i := range out {
				out[i] = c / b[i]
			}
		case opMax:
			for i := range out {
				out[i] = max(c, b[i])
			}
		case opMin:
			for i := range out {
				out[i] = min(c, b[i])
			}
		default:
			for i := range out {
				out[i] = c
			}
		}
	default: // both broadcast along the row: cannot happen for a row longer than 1
		v := apply(op, a[0], b[0])
		for i := range out {
			out[i] = v
		}
	}
}
