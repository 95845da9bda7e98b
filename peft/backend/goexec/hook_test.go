package goexec

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"regexp"
	"testing"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/gomlx/gopjrt/dtypes/bfloat16"

	"peft/peft/blas"
)

func TestVersionMatchesGoMod(t *testing.T) {
	mod, err := os.ReadFile("../../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/gomlx/gomlx (\S+)`).FindSubmatch(mod)
	if m == nil || string(m[1]) != GoMLXVersion {
		t.Fatalf("go.mod requires gomlx %q; this hook knows %s only: check simplego's internals (hook.go) and update GoMLXVersion", m, GoMLXVersion)
	}
	if err := checkVersion(); err != nil {
		t.Fatalf("checkVersion in this test binary: %v", err)
	}
}

func TestVersionFromPath(t *testing.T) {
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{"/root/go/pkg/mod/github.com/gomlx/gomlx@v0.25.0/backends/simplego/simplego.go", true},
		{"github.com/gomlx/gomlx@v0.25.0/backends/simplego/simplego.go", true},
		{"/root/go/pkg/mod/github.com/gomlx/gomlx@v0.26.0/backends/simplego/simplego.go", false},
		{"/home/me/src/gomlx/backends/simplego/simplego.go", false},
		{"", false},
	} {
		err := versionFromPath(tc.path)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrVersion)) {
			t.Errorf("versionFromPath(%q) = %v, want ok=%v", tc.path, err, tc.ok)
		}
	}
}

// dotCase is one DotGeneral layout: operand dimensions and axes.
type dotCase struct {
	name                  string
	lhs                   []int
	lhsContract, lhsBatch []int
	rhs                   []int
	rhsContract, rhsBatch []int
	wantTransposed        bool
}

// modelCases are the layouts the models and their gradients produce (peft.MatMulLast and
// peft/gemmgrad's rules, llama's einsums, adalora's orthogonality terms).
var modelCases = []dotCase{
	{"x·W [b,s,d]·[d,o]", []int{2, 5, 6}, []int{2}, nil, []int{6, 7}, []int{0}, nil, false},
	{"dW = xᵀ·dy", []int{2, 5, 6}, []int{0, 1}, nil, []int{2, 5, 7}, []int{0, 1}, nil, false},
	{"dx = dy·Wᵀ", []int{2, 5, 7}, []int{2}, nil, []int{6, 7}, []int{1}, nil, false},
	{"flat x·W [n,d]·[d,o]", []int{10, 6}, []int{1}, nil, []int{6, 7}, []int{0}, nil, false},
	{"tied head bsd,vd->bsv", []int{2, 5, 6}, []int{2}, nil, []int{9, 6}, []int{1}, nil, false},
	{"pool bs,bsd->bd", []int{2, 5}, []int{1}, []int{0}, []int{2, 5, 6}, []int{1}, []int{0}, false},
	{"scores bqkgd,bskd->bkgqs", []int{2, 5, 3, 2, 4}, []int{4}, []int{0, 2}, []int{2, 5, 3, 4}, []int{3}, []int{0, 2}, true},
	{"values bkgqs,bskd->bqkgd", []int{2, 3, 2, 5, 5}, []int{4}, []int{0, 1}, []int{2, 5, 3, 4}, []int{1}, []int{0, 2}, true},
	{"adalora ir,is->rs", []int{6, 3}, []int{0}, nil, []int{6, 3}, []int{0}, nil, false},
	{"adalora ro,so->rs", []int{3, 7}, []int{1}, nil, []int{3, 7}, []int{1}, nil, false},
	{"size-1 axes", []int{1, 5, 1, 6}, []int{3}, nil, []int{6, 1, 7}, []int{0}, nil, false},
	{"two contracting axes reversed", []int{4, 3, 5}, []int{2, 1}, nil, []int{3, 5, 2}, []int{1, 0}, nil, true},
}

// randomCases draws layouts: random ranks, sizes, axis roles and orders.
func randomCases(n int) []dotCase {
	rng := rand.New(rand.NewPCG(7, 11))
	var cases []dotCase
	for i := range n {
		nb, nc := rng.IntN(3), 1+rng.IntN(2)
		nlx, nrx := rng.IntN(3), rng.IntN(3)
		batchDims, contractDims := dims(rng, nb), dims(rng, nc)
		lhs, lc, lb := place(rng, batchDims, contractDims, dims(rng, nlx))
		rhs, rc, rb := place(rng, batchDims, contractDims, dims(rng, nrx))
		cases = append(cases, dotCase{fmt.Sprintf("random %d", i), lhs, lc, lb, rhs, rc, rb, false})
	}
	return cases
}

func dims(rng *rand.Rand, n int) []int {
	d := make([]int, n)
	for i := range d {
		d[i] = 1 + rng.IntN(4)
	}
	return d
}

// place shuffles the batch, contracting and cross axes into one shape; the batch and
// contracting axes keep their pairing order, which is also shuffled.
func place(rng *rand.Rand, batch, contract, cross []int) (shape, contractAxes, batchAxes []int) {
	type axis struct{ role, index int }
	var axes []axis
	for i := range batch {
		axes = append(axes, axis{2, i})
	}
	for i := range contract {
		axes = append(axes, axis{1, i})
	}
	for i := range cross {
		axes = append(axes, axis{0, i})
	}
	rng.Shuffle(len(axes), func(i, j int) { axes[i], axes[j] = axes[j], axes[i] })
	shape = make([]int, len(axes))
	contractAxes, batchAxes = make([]int, len(contract)), make([]int, len(batch))
	for pos, a := range axes {
		switch a.role {
		case 2:
			shape[pos], batchAxes[a.index] = batch[a.index], pos
		case 1:
			shape[pos], contractAxes[a.index] = contract[a.index], pos
		default:
			shape[pos] = cross[a.index]
		}
	}
	return shape, contractAxes, batchAxes
}

func newBackend(t *testing.T) backends.Backend {
	t.Helper()
	b, err := simplego.New("ops_sequential")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Finalize)
	return b
}

func values(n int, seed uint64) []float64 {
	rng := rand.New(rand.NewPCG(seed, 3))
	v := make([]float64, n)
	for i := range v {
		v[i] = rng.Float64()*2 - 1
	}
	return v
}

func size(d []int) int {
	n := 1
	for _, x := range d {
		n *= x
	}
	return n
}

// run executes the case's DotGeneral on backend with the given dtype, returning float64 values.
func (c dotCase) run(t *testing.T, backend backends.Backend, dtype dtypes.DType) []float64 {
	t.Helper()
	l, r := values(size(c.lhs), 1), values(size(c.rhs), 2)
	var lt, rt *tensors.Tensor
	switch dtype {
	case dtypes.Float64:
		lt, rt = tensors.FromFlatDataAndDimensions(l, c.lhs...), tensors.FromFlatDataAndDimensions(r, c.rhs...)
	case dtypes.Float32:
		lt, rt = tensors.FromFlatDataAndDimensions(toFloat32(l), c.lhs...), tensors.FromFlatDataAndDimensions(toFloat32(r), c.rhs...)
	case dtypes.BFloat16:
		lt, rt = tensors.FromFlatDataAndDimensions(toBF16(l), c.lhs...), tensors.FromFlatDataAndDimensions(toBF16(r), c.rhs...)
	}
	out := graph.MustNewExec(backend, func(a, b *graph.Node) *graph.Node {
		return graph.DotGeneral(a, c.lhsContract, c.lhsBatch, b, c.rhsContract, c.rhsBatch)
	}).MustExec(lt, rt)[0]
	switch dtype {
	case dtypes.Float64:
		return tensors.MustCopyFlatData[float64](out)
	case dtypes.Float32:
		return toFloat64(tensors.MustCopyFlatData[float32](out))
	default:
		flat := tensors.MustCopyFlatData[bfloat16.BFloat16](out)
		v := make([]float64, len(flat))
		for i, x := range flat {
			v[i] = float64(x.Float32())
		}
		return v
	}
}

func toBF16(x []float64) []bfloat16.BFloat16 {
	out := make([]bfloat16.BFloat16, len(x))
	for i, v := range x {
		out[i] = bfloat16.FromFloat32(float32(v))
	}
	return out
}

func kernelsUnderTest(t *testing.T) []Kernels {
	ks := []Kernels{Naive()}
	if lib, err := blas.Load(); err == nil {
		ks = append(ks, Kernels{Name: lib.Version, Float32: lib.Sgemm, Float64: lib.Dgemm})
	} else {
		t.Logf("no BLAS library (%v): checking the hook with the naive kernels only", err)
	}
	return ks
}

// TestHookMatchesStock pins every layout's result through the hook to the stock executor's.
func TestHookMatchesStock(t *testing.T) {
	defer Uninstall()
	backend := newBackend(t)
	cases := append(append([]dotCase{}, modelCases...), randomCases(60)...)
	for _, k := range kernelsUnderTest(t) {
		for _, c := range cases {
			for _, dtype := range []dtypes.DType{dtypes.Float32, dtypes.Float64} {
				t.Run(fmt.Sprintf("%s/%s/%s", k.Name, c.name, dtype), func(t *testing.T) {
					Uninstall()
					want := c.run(t, backend, dtype)
					if err := Install(k); err != nil {
						t.Fatal(err)
					}
					before := Counts()
					got := c.run(t, backend, dtype)
					after := Counts()
					if after.Hooked != before.Hooked+1 {
						t.Fatalf("the product did not go through the hook (%+v → %+v)", before, after)
					}
					if got, want := after.MACs-before.MACs, c.macs(); got != want {
						t.Errorf("%d multiply-adds counted, want %d", got, want)
					}
					if c.wantTransposed && after.Transposed == before.Transposed {
						t.Errorf("expected a transposed operand for this layout")
					}
					if !c.wantTransposed && !c.isRandom() && after.Transposed != before.Transposed {
						t.Errorf("this layout should run without a transpose")
					}
					tol := 1e-12
					if dtype == dtypes.Float32 {
						tol = 1e-5
					}
					if len(got) != len(want) {
						t.Fatalf("%d values, stock %d", len(got), len(want))
					}
					for i := range want {
						if math.Abs(got[i]-want[i]) > tol {
							t.Fatalf("value %d: hook %g, stock %g", i, got[i], want[i])
						}
					}
				})
			}
		}
	}
}

// macs is batch·m·n·k: every lhs value meets every rhs cross value of its batch.
func (c dotCase) macs() int64 {
	rhsNonCross := 1
	for _, a := range append(append([]int{}, c.rhsContract...), c.rhsBatch...) {
		rhsNonCross *= c.rhs[a]
	}
	return int64(size(c.lhs)) * int64(size(c.rhs)/rhsNonCross)
}

func (c dotCase) isRandom() bool { return len(c.name) > 6 && c.name[:6] == "random" }

// TestOtherDTypesFallBack: a bfloat16 product runs on the stock executor, with the same result.
func TestOtherDTypesFallBack(t *testing.T) {
	defer Uninstall()
	backend := newBackend(t)
	c := modelCases[0]
	want := c.run(t, backend, dtypes.BFloat16)
	if err := Install(Naive()); err != nil {
		t.Fatal(err)
	}
	before := Counts()
	got := c.run(t, backend, dtypes.BFloat16)
	after := Counts()
	if after.Fallbacks != before.Fallbacks+1 || after.Hooked != before.Hooked {
		t.Fatalf("bfloat16 should pass to the stock executor: %+v → %+v", before, after)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("value %d: %g, stock %g", i, got[i], want[i])
		}
	}
}

// TestSelfCheckCatchesWrongKernels: a kernel that computes the wrong thing is refused and
// uninstalled.
func TestSelfCheckCatchesWrongKernels(t *testing.T) {
	defer Uninstall()
	wrong := Naive()
	wrong.Name = "transposes B wrongly"
	inner := wrong.Float32
	wrong.Float32 = func(transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, c []float32, ldc int) {
		inner(transA, !transB, m, n, k, a, lda, b, ldb, c, ldc)
	}
	err := Install(wrong)
	if err == nil || Installed() != nil {
		t.Fatalf("Install(wrong kernels) = %v, installed %v; want an error and nothing installed", err, Installed())
	}
	t.Log(err)
	if err := Install(Kernels{Name: "none"}); err == nil {
		t.Fatal("Install without kernels should fail")
	}
}

func TestTransposeTable(t *testing.T) {
	src := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11} // [2,3,2]
	for _, tc := range []struct {
		perm []int
		want []int
	}{
		{[]int{0, 1, 2}, src},
		{[]int{2, 1, 0}, []int{0, 6, 2, 8, 4, 10, 1, 7, 3, 9, 5, 11}},
		{[]int{1, 0, 2}, []int{0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11}},
		{[]int{0, 2, 1}, []int{0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11}},
	} {
		got := make([]int, len(src))
		transpose(got, src, []int{2, 3, 2}, tc.perm)
		for i := range got {
			if got[i] != tc.want[i] {
				t.Fatalf("perm %v: %v, want %v", tc.perm, got, tc.want)
			}
		}
	}
}

func TestMain(m *testing.M) {
	// The tests check the executors themselves: a $PEFT_GOEXEC=off from outside must not turn
	// them into no-ops (TestDisabled checks the variable).
	os.Unsetenv(EnvDisable)
	os.Exit(m.Run())
}

func TestDisabled(t *testing.T) {
	t.Setenv(EnvDisable, "off")
	for name, install := range map[string]func() error{
		"Install":        func() error { return Install(Naive()) },
		"InstallRowWise": InstallRowWise,
		"RunOpsInParallel": func() error {
			return RunOpsInParallel(nil) // refused before the backend is touched
		},
	} {
		if err := install(); !errors.Is(err, ErrDisabled) {
			t.Errorf("%s with %s=off: %v, want ErrDisabled", name, EnvDisable, err)
		}
	}
}

// TestSplitProducts: large products split over goroutines (Kernels.Split, three parts so that
// the ranges are uneven) by rows of op(A), by columns of op(B) and by batch, with either
// operand transposed, give the stock results.
func TestSplitProducts(t *testing.T) {
	defer Uninstall()
	backend := newBackend(t)
	cases := []dotCase{
		{"rows", []int{1, 256, 64}, []int{2}, nil, []int{64, 96}, []int{0}, nil, false},
		{"rows of Aᵀ", []int{256, 128}, []int{0}, nil, []int{256, 48}, []int{0}, nil, false},
		{"columns", []int{256, 64}, []int{0}, nil, []int{256, 96}, []int{0}, nil, false},
		{"columns of Bᵀ", []int{64, 256}, []int{1}, nil, []int{96, 256}, []int{1}, nil, false},
		{"batch", []int{4, 128, 64}, []int{2}, []int{0}, []int{4, 64, 128}, []int{1}, []int{0}, false},
	}
	split := Naive()
	split.Split = 3
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			Uninstall()
			want := c.run(t, backend, dtypes.Float64)
			if err := Install(split); err != nil {
				t.Fatal(err)
			}
			got := c.run(t, backend, dtypes.Float64)
			for i := range want {
				if math.Abs(got[i]-want[i]) > 1e-9 {
					t.Fatalf("value %d: split %g, stock %g", i, got[i], want[i])
				}
			}
		})
	}
}
