package gemmgrad

import (
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"sync"
	"testing"
	"unsafe"

	"github.com/gomlx/gomlx/backends"
	_ "github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"
)

var (
	backendOnce sync.Once
	testBackend backends.Backend
)

// backend returns the shared pure-Go backend. "go:ops_sequential" is used on
// purpose: the default "go" configuration can deadlock on graphs with several
// matmuls.
func backend(t testing.TB) backends.Backend {
	t.Helper()
	backendOnce.Do(func() {
		var err error
		testBackend, err = backends.NewWithConfig("go:ops_sequential")
		if err != nil {
			panic(err)
		}
	})
	return testBackend
}

// funcIdentity returns the address of the closure object behind fn, so that
// two different closures sharing the same code (as all of GoMLX's
// vjpForSingleOutput wrappers do) compare different.
func funcIdentity(fn graph.VJP) uintptr {
	return uintptr(*(*unsafe.Pointer)(unsafe.Pointer(&fn)))
}

type gradCase struct {
	name     string
	lhsDims  []int
	rhsDims  []int
	outDims  []int // expected forward output shape.
	build    func(lhs, rhs *graph.Node) *graph.Node
	sameNode bool // build uses lhs for both operands (rhs gradient is zero).
}

func dg(lc, lb, rc, rb []int) func(lhs, rhs *graph.Node) *graph.Node {
	return func(lhs, rhs *graph.Node) *graph.Node {
		return graph.DotGeneral(lhs, lc, lb, rhs, rc, rb)
	}
}

func einsum(eq string) func(lhs, rhs *graph.Node) *graph.Node {
	return func(lhs, rhs *graph.Node) *graph.Node { return graph.Einsum(eq, lhs, rhs) }
}

func ints(v ...int) []int { return v }

var gradCases = []gradCase{
	// Plain and transposed matrix products.
	{name: "mk_kn", lhsDims: ints(3, 4), rhsDims: ints(4, 5), outDims: ints(3, 5), build: dg(ints(1), nil, ints(0), nil)},
	{name: "km_kn_lhsT", lhsDims: ints(4, 3), rhsDims: ints(4, 5), outDims: ints(3, 5), build: dg(ints(0), nil, ints(0), nil)},
	{name: "mk_nk_rhsT", lhsDims: ints(3, 4), rhsDims: ints(5, 4), outDims: ints(3, 5), build: dg(ints(1), nil, ints(1), nil)},
	{name: "km_nk_bothT", lhsDims: ints(4, 3), rhsDims: ints(5, 4), outDims: ints(3, 5), build: dg(ints(0), nil, ints(1), nil)},
	{name: "negative_axes", lhsDims: ints(3, 4), rhsDims: ints(5, 4), outDims: ints(3, 5), build: dg(ints(-1), nil, ints(-1), nil)},
	{name: "square_ambiguous", lhsDims: ints(4, 4), rhsDims: ints(4, 4), outDims: ints(4, 4), build: dg(ints(0), nil, ints(1), nil)},

	// Batch axes.
	{name: "batch_front", lhsDims: ints(2, 3, 4), rhsDims: ints(2, 4, 5), outDims: ints(2, 3, 5), build: dg(ints(2), ints(0), ints(1), ints(0))},
	{name: "batch_middle", lhsDims: ints(3, 2, 4), rhsDims: ints(4, 2, 5), outDims: ints(2, 3, 5), build: dg(ints(2), ints(1), ints(0), ints(1))},
	{name: "batch_front_rhs_transposed", lhsDims: ints(2, 4, 3), rhsDims: ints(2, 5, 4), outDims: ints(2, 3, 5), build: dg(ints(1), ints(0), ints(2), ints(0))},
	{name: "two_batch_axes_swapped", lhsDims: ints(2, 3, 4, 6), rhsDims: ints(6, 4, 5, 2), outDims: ints(6, 2, 3, 5),
		build: dg(ints(2), ints(3, 0), ints(1), ints(0, 3))},
	{name: "batch_only", lhsDims: ints(2, 3), rhsDims: ints(2, 3), outDims: ints(2), build: dg(ints(1), ints(0), ints(1), ints(0))},
	{name: "batch_no_contraction", lhsDims: ints(2, 3), rhsDims: ints(4, 2), outDims: ints(2, 3, 4), build: dg(nil, ints(0), nil, ints(1))},

	// Several contracting axes.
	{name: "two_contracting", lhsDims: ints(3, 4, 5), rhsDims: ints(4, 5, 6), outDims: ints(3, 6), build: dg(ints(1, 2), nil, ints(0, 1), nil)},
	{name: "two_contracting_crossed", lhsDims: ints(3, 4, 5), rhsDims: ints(4, 6, 5), outDims: ints(3, 6), build: dg(ints(2, 1), nil, ints(2, 0), nil)},
	{name: "contract_all", lhsDims: ints(3, 4), rhsDims: ints(4, 3), outDims: nil, build: dg(ints(0, 1), nil, ints(1, 0), nil)},

	// Several free axes, interleaved with batch and contracting axes.
	{name: "several_free", lhsDims: ints(2, 3, 4, 5), rhsDims: ints(6, 4, 7), outDims: ints(2, 3, 5, 6, 7), build: dg(ints(2), nil, ints(1), nil)},
	{name: "interleaved", lhsDims: ints(3, 2, 4, 5, 6), rhsDims: ints(6, 7, 2, 4), outDims: ints(2, 3, 5, 7),
		build: dg(ints(2, 4), ints(1), ints(3, 0), ints(2))},
	{name: "outer_product", lhsDims: ints(3, 4), rhsDims: ints(5), outDims: ints(3, 4, 5), build: dg(nil, nil, nil, nil)},

	// Dense-like einsum and other Einsum strings.
	{name: "dense_abc_cd", lhsDims: ints(2, 3, 4), rhsDims: ints(4, 5), outDims: ints(2, 3, 5), build: dg(ints(2), nil, ints(0), nil)},
	{name: "einsum_abc,cd->abd", lhsDims: ints(2, 3, 4), rhsDims: ints(4, 5), outDims: ints(2, 3, 5), build: einsum("abc,cd->abd")},
	{name: "einsum_bij,bjk->bik", lhsDims: ints(2, 3, 4), rhsDims: ints(2, 4, 5), outDims: ints(2, 3, 5), build: einsum("bij,bjk->bik")},
	{name: "einsum_attention_scores", lhsDims: ints(2, 3, 4, 5), rhsDims: ints(2, 3, 6, 5), outDims: ints(2, 3, 4, 6), build: einsum("bhqd,bhkd->bhqk")},
	{name: "einsum_attention_values", lhsDims: ints(2, 3, 4, 6), rhsDims: ints(2, 3, 6, 5), outDims: ints(2, 3, 4, 5), build: einsum("bhqk,bhkd->bhqd")},
	{name: "einsum_ij,kj->ik", lhsDims: ints(3, 4), rhsDims: ints(5, 4), outDims: ints(3, 5), build: einsum("ij,kj->ik")},
	{name: "einsum_output_transposed", lhsDims: ints(2, 3, 4), rhsDims: ints(2, 4, 5), outDims: ints(2, 5, 3), build: einsum("bij,bjk->bki")},
	{name: "einsum_lora_down", lhsDims: ints(2, 3, 6), rhsDims: ints(2, 6), outDims: ints(2, 3, 2), build: einsum("bsd,rd->bsr")},

	// graph.Dot and graph.MatMul.
	{name: "dot_vec_vec", lhsDims: ints(4), rhsDims: ints(4), outDims: nil, build: graph.Dot},
	{name: "dot_mat_vec", lhsDims: ints(3, 4), rhsDims: ints(4), outDims: ints(3), build: graph.Dot},
	{name: "dot_mat_mat", lhsDims: ints(3, 4), rhsDims: ints(4, 5), outDims: ints(3, 5), build: graph.Dot},
	{name: "matmul_rank3_rank2", lhsDims: ints(2, 3, 4), rhsDims: ints(4, 5), outDims: ints(2, 3, 5), build: graph.MatMul},
	{name: "matmul_batched", lhsDims: ints(2, 3, 4), rhsDims: ints(2, 4, 5), outDims: ints(2, 3, 5), build: graph.MatMul},

	// The same node on both sides: x · xᵀ (gradient contributions accumulate).
	{name: "same_operand_xxT", lhsDims: ints(3, 4), rhsDims: ints(3, 4), outDims: ints(3, 3), sameNode: true,
		build: func(lhs, _ *graph.Node) *graph.Node { return graph.DotGeneral(lhs, ints(1), nil, lhs, ints(1), nil) }},
}

func randomTensor(rng *rand.Rand, dims []int) *tensors.Tensor {
	size := 1
	for _, d := range dims {
		size *= d
	}
	data := make([]float32, size)
	for i := range data {
		data[i] = float32(rng.NormFloat64())
	}
	return tensors.FromFlatDataAndDimensions(data, dims...)
}

// gradients computes out = build(lhs, rhs) and the gradients of sum(out * cot)
// with respect to lhs and rhs, with whichever matmul rules are installed now.
func gradients(t *testing.T, c gradCase, lhs, rhs, cot *tensors.Tensor) (out, dlhs, drhs *tensors.Tensor) {
	t.Helper()
	res := graph.MustExecOnceN(backend(t), func(lhs, rhs, cot *graph.Node) (*graph.Node, *graph.Node, *graph.Node) {
		out := c.build(lhs, rhs)
		loss := graph.ReduceAllSum(graph.Mul(out, cot))
		g := graph.Gradient(loss, lhs, rhs)
		return out, g[0], g[1]
	}, lhs, rhs, cot)
	return res[0], res[1], res[2]
}

// requireClose compares two float32 tensors element-wise with a relative
// tolerance (scaled by the largest magnitude in want, so that entries near
// zero are not judged by an unbounded relative error).
func requireClose(t *testing.T, what string, want, got *tensors.Tensor) {
	t.Helper()
	require.True(t, want.Shape().Equal(got.Shape()), "%s: shape %s, want %s", what, got.Shape(), want.Shape())
	w := tensors.MustCopyFlatData[float32](want)
	g := tensors.MustCopyFlatData[float32](got)
	scale := 0.0
	for _, x := range w {
		scale = math.Max(scale, math.Abs(float64(x)))
	}
	const rtol = 1e-5
	for i := range w {
		diff := math.Abs(float64(w[i]) - float64(g[i]))
		tol := rtol * (math.Abs(float64(w[i])) + scale)
		if diff > tol {
			require.Failf(t, "values differ", "%s: flat index %d: got %g, want %g (diff %g > tol %g)",
				what, i, g[i], w[i], diff, tol)
		}
	}
}

func TestGEMMGradientsMatchStock(t *testing.T) {
	t.Cleanup(Disable)
	for ci, c := range gradCases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(ci), 42))
			lhs := randomTensor(rng, c.lhsDims)
			rhs := randomTensor(rng, c.rhsDims)
			cot := randomTensor(rng, c.outDims)

			Disable()
			require.False(t, Enabled())
			gemmBefore, fallbackBefore := gemmCount.Load(), fallbackCount.Load()
			stockOut, stockDL, stockDR := gradients(t, c, lhs, rhs, cot)
			require.Equal(t, gemmBefore, gemmCount.Load(), "GEMM rule used while disabled")
			require.Equal(t, fallbackBefore, fallbackCount.Load(), "GEMM rule used while disabled")
			require.Equal(t, c.outDims, nilIfEmpty(stockOut.Shape().Dimensions), "forward output shape")

			Enable()
			require.True(t, Enabled())
			gemmOut, gemmDL, gemmDR := gradients(t, c, lhs, rhs, cot)
			require.Greater(t, gemmCount.Load(), gemmBefore, "GEMM-form rule was not used")
			require.Equal(t, fallbackBefore, fallbackCount.Load(), "GEMM-form rule fell back to the stock rule")

			requireClose(t, "forward", stockOut, gemmOut)
			require.Equal(t, c.lhsDims, stockDL.Shape().Dimensions, "stock d/dlhs shape")
			require.Equal(t, c.lhsDims, gemmDL.Shape().Dimensions, "gemm d/dlhs shape")
			require.Equal(t, c.rhsDims, stockDR.Shape().Dimensions, "stock d/drhs shape")
			require.Equal(t, c.rhsDims, gemmDR.Shape().Dimensions, "gemm d/drhs shape")
			require.Equal(t, stockDL.Shape().DType, gemmDL.Shape().DType)
			require.Equal(t, stockDR.Shape().DType, gemmDR.Shape().DType)
			requireClose(t, "d/dlhs", stockDL, gemmDL)
			requireClose(t, "d/drhs", stockDR, gemmDR)
			if !c.sameNode {
				requireNonZero(t, "d/drhs", gemmDR)
			}
			requireNonZero(t, "d/dlhs", gemmDL)
		})
	}
}

// TestGEMMGradientsFloat64 pins one layout in float64 with a much tighter
// tolerance, so a subtly wrong rule cannot hide in float32 rounding.
func TestGEMMGradientsFloat64(t *testing.T) {
	t.Cleanup(Disable)
	rng := rand.New(rand.NewPCG(7, 7))
	mk := func(dims ...int) *tensors.Tensor {
		size := 1
		for _, d := range dims {
			size *= d
		}
		data := make([]float64, size)
		for i := range data {
			data[i] = rng.NormFloat64()
		}
		return tensors.FromFlatDataAndDimensions(data, dims...)
	}
	lhs, rhs, cot := mk(3, 2, 4, 5, 6), mk(6, 7, 2, 4), mk(2, 3, 5, 7)
	fn := func(lhs, rhs, cot *graph.Node) (*graph.Node, *graph.Node) {
		out := graph.DotGeneral(lhs, ints(2, 4), ints(1), rhs, ints(3, 0), ints(2))
		g := graph.Gradient(graph.ReduceAllSum(graph.Mul(out, cot)), lhs, rhs)
		return g[0], g[1]
	}
	Disable()
	stock := graph.MustExecOnceN(backend(t), fn, lhs, rhs, cot)
	Enable()
	gemm := graph.MustExecOnceN(backend(t), fn, lhs, rhs, cot)
	for i := range 2 {
		require.True(t, stock[i].Shape().Equal(gemm[i].Shape()))
		s := tensors.MustCopyFlatData[float64](stock[i])
		g := tensors.MustCopyFlatData[float64](gemm[i])
		require.InDeltaSlice(t, s, g, 1e-12, "operand %d", i)
	}
}

func nilIfEmpty(dims []int) []int {
	if len(dims) == 0 {
		return nil
	}
	return dims
}

func requireNonZero(t *testing.T, what string, x *tensors.Tensor) {
	t.Helper()
	for _, v := range tensors.MustCopyFlatData[float32](x) {
		if v != 0 {
			return
		}
	}
	require.Failf(t, "all zeros", "%s is all zeros: the comparison would be vacuous", what)
}

// TestGEMMGraphHasNoBroadcastTemporary checks that the GEMM-form gradient of
// a Dense-like einsum builds no node larger than the operands and output,
// whereas the stock rule builds the [rows, out, in] temporary.
func TestGEMMGraphHasNoBroadcastTemporary(t *testing.T) {
	t.Cleanup(Disable)
	lhsShape := shapes.Make(dtypes.F32, 2, 3, 8)
	rhsShape := shapes.Make(dtypes.F32, 8, 16)
	maxSize := func() int {
		g := graph.NewGraph(backend(t), "probe")
		defer g.Finalize()
		lhs := graph.Parameter(g, "lhs", lhsShape)
		rhs := graph.Parameter(g, "rhs", rhsShape)
		out := graph.Einsum("abc,cd->abd", lhs, rhs)
		graph.Gradient(graph.ReduceAllSum(graph.Mul(out, out)), lhs, rhs)
		largest := 0
		for _, n := range g.Nodes() {
			if n.NumOutputs() == 1 {
				largest = max(largest, n.Shape().Size())
			}
		}
		return largest
	}
	Disable()
	stockMax := maxSize()
	Enable()
	gemmMax := maxSize()
	require.GreaterOrEqual(t, stockMax, 2*3*8*16, "stock rule no longer builds the broadcast temporary?")
	require.LessOrEqual(t, gemmMax, max(lhsShape.Size(), rhsShape.Size(), 2*3*16))
}

func TestDisableRestoresStockRules(t *testing.T) {
	t.Cleanup(Disable)
	Disable()
	origDG := graph.VJPRegistration[graph.NodeTypeDotGeneral]
	origDot := graph.VJPRegistration[graph.NodeTypeDot]
	require.NotNil(t, origDG)
	require.NotNil(t, origDot)
	// The package captured GoMLX's own rules at initialisation.
	require.Equal(t, funcIdentity(stockDotGeneral), funcIdentity(origDG))
	require.Equal(t, funcIdentity(stockDot), funcIdentity(origDot))

	for range 2 { // Enable is idempotent: a second call must not save our own rules as "previous".
		Enable()
		require.True(t, Enabled())
		require.Equal(t, reflect.ValueOf(graph.VJP(dotGeneralGEMMVJP)).Pointer(),
			reflect.ValueOf(graph.VJPRegistration[graph.NodeTypeDotGeneral]).Pointer())
		require.Equal(t, reflect.ValueOf(graph.VJP(dotGEMMVJP)).Pointer(),
			reflect.ValueOf(graph.VJPRegistration[graph.NodeTypeDot]).Pointer())
		require.NotEqual(t, reflect.ValueOf(origDG).Pointer(),
			reflect.ValueOf(graph.VJPRegistration[graph.NodeTypeDotGeneral]).Pointer())
	}
	for range 2 { // Disable is idempotent.
		Disable()
		require.False(t, Enabled())
		require.Equal(t, reflect.ValueOf(origDG).Pointer(), reflect.ValueOf(graph.VJPRegistration[graph.NodeTypeDotGeneral]).Pointer())
		require.Equal(t, reflect.ValueOf(origDot).Pointer(), reflect.ValueOf(graph.VJPRegistration[graph.NodeTypeDot]).Pointer())
		// All of GoMLX's single-output rules share one code pointer (vjpForSingleOutput closures),
		// so also compare closure identity.
		require.Equal(t, funcIdentity(origDG), funcIdentity(graph.VJPRegistration[graph.NodeTypeDotGeneral]))
		require.Equal(t, funcIdentity(origDot), funcIdentity(graph.VJPRegistration[graph.NodeTypeDot]))
	}

	// Behaviour: with the rules disabled the GEMM path is not taken.
	before := gemmCount.Load()
	c := gradCases[0]
	rng := rand.New(rand.NewPCG(1, 2))
	gradients(t, c, randomTensor(rng, c.lhsDims), randomTensor(rng, c.rhsDims), randomTensor(rng, c.outDims))
	require.Equal(t, before, gemmCount.Load())
}

func TestEnableFromEnv(t *testing.T) {
	t.Cleanup(Disable)
	for _, tc := range []struct {
		value string
		want  bool
	}{
		{"", true}, {"1", true}, {"true", true}, {"on", true}, {"yes", true},
		{"0", false}, {"false", false}, {"FALSE", false}, {"off", false}, {" Off ", false},
	} {
		t.Run(fmt.Sprintf("%q", tc.value), func(t *testing.T) {
			Disable()
			t.Setenv(envVar, tc.value)
			require.Equal(t, tc.want, EnableFromEnv())
			require.Equal(t, tc.want, Enabled())
		})
	}
}

func TestEnableDisableConcurrent(t *testing.T) {
	t.Cleanup(Disable)
	Disable()
	origDG := funcIdentity(graph.VJPRegistration[graph.NodeTypeDotGeneral])
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 100 {
				if (i+j)%2 == 0 {
					Enable()
				} else {
					Disable()
				}
				_ = Enabled()
			}
		}()
	}
	wg.Wait()
	Disable()
	require.Equal(t, origDG, funcIdentity(graph.VJPRegistration[graph.NodeTypeDotGeneral]))
}

func TestLayoutReaderRejectsOtherNodes(t *testing.T) {
	g := graph.NewGraph(backend(t), "probe")
	defer g.Finalize()
	x := graph.Parameter(g, "x", shapes.Make(dtypes.F32, 2, 3))
	_, reason := dotGeneralLayout(graph.Add(x, x))
	require.NotEmpty(t, reason)

	d := graph.DotGeneral(x, ints(1), nil, x, ints(1), nil)
	layout, reason := dotGeneralLayout(d)
	require.Empty(t, reason)
	require.Equal(t, ints(1), layout.lhsContracting)
	require.Equal(t, ints(1), layout.rhsContracting)
	require.Empty(t, layout.lhsBatch)
	require.Empty(t, layout.rhsBatch)
}
