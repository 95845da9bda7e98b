package goexec

import (
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
)

// DotGeneral semantics (simplego's normalised node): the output is [batch, lhsCross, rhsCross],
// row-major, where batch flattens the batch axes in the order listed, each cross size flattens
// the operand's remaining axes in axis order, and the contracting axes pair up in the order
// listed. An operand is one matrix per batch index when its axes lie in memory as
//
//	batch…, cross…, contracting…   (rows are cross: lhs is A m×k; rhs is Bᵀ n×k)
//	batch…, contracting…, cross…   (rows are contracting: lhs is Aᵀ k×m; rhs is B k×n)
//
// ignoring axes of size 1. Otherwise it is transposed into the first layout in scratch memory.

// operandLayout says how one operand is read: as stored (perm == nil) or through a transpose
// by perm; rowsContract tells which of the two layouts above results.
type operandLayout struct {
	perm         []int
	rowsContract bool
}

func layoutOf(dims, batchAxes, contractAxes []int) operandLayout {
	rank := len(dims)
	kind := make([]byte, rank) // 0 cross, 1 contracting, 2 batch
	for _, a := range contractAxes {
		kind[a] = 1
	}
	for _, a := range batchAxes {
		kind[a] = 2
	}
	cross := make([]int, 0, rank)
	for a := range rank {
		if kind[a] == 0 {
			cross = append(cross, a)
		}
	}
	rowsCross := slices.Concat(batchAxes, cross, contractAxes)
	rowsContract := slices.Concat(batchAxes, contractAxes, cross)
	inMemory := func(order []int) bool {
		last := -1
		for _, a := range order {
			if dims[a] == 1 {
				continue
			}
			if a < last {
				return false
			}
			last = a
		}
		return true
	}
	switch {
	case inMemory(rowsCross):
		return operandLayout{}
	case inMemory(rowsContract):
		return operandLayout{rowsContract: true}
	default:
		return operandLayout{perm: rowsCross}
	}
}

// product computes the DotGeneral described by p into out ([batch, lhsCross, rhsCross]) with
// gemm. It reports whether an operand had to be transposed first.
func product[T float32 | float64](gemm Gemm[T], split int, p *dotGeneralNodeData, lhsDims []int, lhs []T, rhsDims []int, rhs []T, out []T) (transposedAny bool) {
	batch, m, n, k := p.batchSize, p.lhsCrossSize, p.rhsCrossSize, p.contractingSize
	lhsLayout := layoutOf(lhsDims, p.lhsBatchAxes, p.lhsContractingAxes)
	rhsLayout := layoutOf(rhsDims, p.rhsBatchAxes, p.rhsContractingAxes)
	if lhsLayout.perm != nil {
		buf := getScratch[T](len(lhs))
		defer putScratch(buf)
		transpose(*buf, lhs, lhsDims, lhsLayout.perm)
		lhs = *buf
	}
	if rhsLayout.perm != nil {
		buf := getScratch[T](len(rhs))
		defer putScratch(buf)
		transpose(*buf, rhs, rhsDims, rhsLayout.perm)
		rhs = *buf
	}
	transA, lda := false, k
	if lhsLayout.rowsContract {
		transA, lda = true, m
	}
	transB, ldb := true, k
	if rhsLayout.rowsContract {
		transB, ldb = false, n
	}
	one := func(i int) {
		gemm(transA, transB, m, n, k, lhs[i*m*k:(i+1)*m*k], lda, rhs[i*n*k:(i+1)*n*k], ldb, out[i*m*n:(i+1)*m*n], n)
	}
	switch {
	case split <= 1 || batch*m*n*k < SplitMinMACs:
		for i := range batch {
			one(i)
		}
	case batch >= split:
		parallelFor(split, batch, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				one(i)
			}
		})
	default:
		for i := range batch {
			a, b, c := lhs[i*m*k:(i+1)*m*k], rhs[i*n*k:(i+1)*n*k], out[i*m*n:(i+1)*m*n]
			if m >= n { // split op(A)'s rows and C's
				parallelFor(split, m, func(lo, hi int) {
					aOff := lo * lda
					if transA {
						aOff = lo
					}
					gemm(transA, transB, hi-lo, n, k, a[aOff:], lda, b, ldb, c[lo*n:], n)
				})
			} else { // split op(B)'s columns and C's
				parallelFor(split, n, func(lo, hi int) {
					bOff := lo
					if transB {
						bOff = lo * ldb
					}
					gemm(transA, transB, m, hi-lo, k, a, lda, b[bOff:], ldb, c[lo:], n)
				})
			}
		}
	}
	return lhsLayout.perm != nil || rhsLayout.perm != nil
}

// parallelFor splits [0, n) into at most parts ranges and runs fn on each, the last one on the
// calling goroutine.
func parallelFor(parts, n int, fn func(lo, hi int)) {
	parts = min(parts, n)
	var wg sync.WaitGroup
	for p := range parts - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(p*n/parts, (p+1)*n/parts)
		}()
	}
	fn((parts-1)*n/parts, n)
	wg.Wait()
}

// transpose writes src (row-major, dims) into dst with its axes reordered: dst's axis j is
// src's axis perm[j].
func transpose[T any](dst, src []T, dims, perm []int) {
	rank := len(perm)
	if rank == 0 {
		copy(dst, src)
		return
	}
	srcStrides := make([]int, rank)
	for s, i := 1, rank-1; i >= 0; i-- {
		srcStrides[i] = s
		s *= dims[i]
	}
	outDims, strides := make([]int, rank), make([]int, rank)
	for j, a := range perm {
		outDims[j], strides[j] = dims[a], srcStrides[a]
	}
	inner, innerStride := outDims[rank-1], strides[rank-1]
	idx := make([]int, rank)
	at := 0
	for d := 0; d < len(dst); d += inner {
		row := dst[d : d+inner]
		for i := range row {
			row[i] = src[at+i*innerStride]
		}
		for ax := rank - 2; ax >= 0; ax-- {
			idx[ax]++
			at += strides[ax]
			if idx[ax] < outDims[ax] {
				break
			}
			at -= strides[ax] * outDims[ax]
			idx[ax] = 0
		}
	}
}

// Scratch buffers for transposed operands, reused across products.
var scratch32, scratch64 sync.Pool

func poolOf[T float32 | float64]() *sync.Pool {
	var zero T
	if _, ok := any(zero).(float32); ok {
		return &scratch32
	}
	return &scratch64
}

func getScratch[T float32 | float64](n int) *[]T {
	if b, ok := poolOf[T]().Get().(*[]T); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]T, n)
	return &b
}

func putScratch[T float32 | float64](b *[]T) { poolOf[T]().Put(b) }

// selfCheck runs one batched product with a transposed operand through the hook on a fresh
// pure-Go backend and compares it with the definition.
func selfCheck() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	backend, err := simplego.New("")
	if err != nil {
		return err
	}
	defer backend.Finalize()
	// lhs [2 cross, 3 batch, 4 contract]; rhs [4 contract, 5 cross, 3 batch]: out [3, 2, 5].
	lhs := make([]float64, 2*3*4)
	rhs := make([]float64, 4*5*3)
	for i := range lhs {
		lhs[i] = float64(i%7) - 3
	}
	for i := range rhs {
		rhs[i] = float64(i%5) - 1.5
	}
	want := make([]float64, 3*2*5)
	for b := range 3 {
		for i := range 2 {
			for j := range 5 {
				var s float64
				for c := range 4 {
					s += lhs[(i*3+b)*4+c] * rhs[(c*5+j)*3+b]
				}
				want[(b*2+i)*5+j] = s
			}
		}
	}
	fn := func(l, r *graph.Node) *graph.Node {
		return graph.DotGeneral(l, []int{2}, []int{1}, r, []int{0}, []int{2})
	}
	check := func(got []float64, tol float64, dtype string) error {
		for i, w := range want {
			if math.Abs(got[i]-w) > tol {
				return fmt.Errorf("%s product value %d is %g, want %g", dtype, i, got[i], w)
			}
		}
		return nil
	}
	k := active.Load()
	before := hooked.Load()
	if k.Float64 != nil {
		out := graph.MustNewExec(backend, fn).MustExec(
			tensors.FromFlatDataAndDimensions(lhs, 2, 3, 4), tensors.FromFlatDataAndDimensions(rhs, 4, 5, 3))[0]
		if err := check(tensors.MustCopyFlatData[float64](out), 1e-12, "float64"); err != nil {
			return err
		}
	}
	if k.Float32 != nil {
		out := graph.MustNewExec(backend, fn).MustExec(
			tensors.FromFlatDataAndDimensions(toFloat32(lhs), 2, 3, 4), tensors.FromFlatDataAndDimensions(toFloat32(rhs), 4, 5, 3))[0]
		got := tensors.MustCopyFlatData[float32](out)
		if err := check(toFloat64(got), 1e-4, "float32"); err != nil {
			return err
		}
	}
	if hooked.Load() == before {
		return fmt.Errorf("the products did not reach the hook")
	}
	return nil
}

func toFloat32(x []float64) []float32 {
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}

func toFloat64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}
