package blas

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"peft/peft/backend/goexec"
	"strings"
	"testing"
)

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want error
		text string
	}{
		{"off", ErrDisabled, "off"},
		{" OFF ", ErrDisabled, "off"},
		{"/nonexistent/libnothing.so", ErrNotFound, "/nonexistent/libnothing.so"},
		{"/dev/null", ErrNotFound, "/dev/null"},
	} {
		t.Run(tc.env, func(t *testing.T) {
			lib, err := load(tc.env)
			if lib != nil || !errors.Is(err, tc.want) {
				t.Fatalf("load(%q) = %v, %v; want %v", tc.env, lib, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.text) {
				t.Errorf("error %q does not name %q", err, tc.text)
			}
		})
	}
}

func TestNotFoundSaysHowToInstall(t *testing.T) {
	saved := defaultNames
	defer func() { defaultNames = saved }()
	defaultNames = []string{"/nonexistent/libopenblas.so.0"}
	_, err := load("")
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "libopenblas0-pthread") ||
		!strings.Contains(err.Error(), defaultNames[0]) {
		t.Fatalf("error %q should wrap ErrNotFound and name the Debian package", err)
	}
}

func TestGemmAgainstDefinition(t *testing.T) {
	lib, err := Load()
	if err != nil {
		t.Skipf("no BLAS library on this machine (%v): the binding cannot be checked here", err)
	}
	t.Logf("BLAS: %s, %d threads", lib.Version, lib.Threads())
	rng := rand.New(rand.NewPCG(1, 2))
	for _, sz := range [][3]int{{1, 1, 1}, {3, 5, 7}, {64, 48, 33}, {130, 70, 257}} {
		m, n, k := sz[0], sz[1], sz[2]
		for _, transA := range []bool{false, true} {
			for _, transB := range []bool{false, true} {
				name := fmt.Sprintf("%dx%dx%d/tA=%v/tB=%v", m, n, k, transA, transB)
				t.Run(name, func(t *testing.T) {
					// Row strides larger than the rows, so that a stride mix-up shows.
					lda, ldb, ldc := k+3, n+2, n+1
					rowsA, rowsB := m, k
					if transA {
						lda, rowsA = m+3, k
					}
					if transB {
						ldb, rowsB = k+2, n
					}
					a64 := make([]float64, rowsA*lda)
					b64 := make([]float64, rowsB*ldb)
					for i := range a64 {
						a64[i] = rng.Float64()*2 - 1
					}
					for i := range b64 {
						b64[i] = rng.Float64()*2 - 1
					}
					want := make([]float64, m*n)
					goexec.Naive().Float64(transA, transB, m, n, k, a64, lda, b64, ldb, want, n)

					c64 := make([]float64, m*ldc)
					lib.Dgemm(transA, transB, m, n, k, a64, lda, b64, ldb, c64, ldc)
					a32, b32 := toF32(a64), toF32(b64)
					c32 := make([]float32, m*ldc)
					lib.Sgemm(transA, transB, m, n, k, a32, lda, b32, ldb, c32, ldc)
					for i := range m {
						for j := range n {
							w := want[i*n+j]
							if d := c64[i*ldc+j] - w; d > 1e-12 || d < -1e-12 {
								t.Fatalf("Dgemm C[%d][%d] = %g, want %g", i, j, c64[i*ldc+j], w)
							}
							if d := float64(c32[i*ldc+j]) - w; d > 1e-4 || d < -1e-4 {
								t.Fatalf("Sgemm C[%d][%d] = %g, want %g", i, j, c32[i*ldc+j], w)
							}
						}
					}
				})
			}
		}
	}
}

func TestGemmRefusesShortSlices(t *testing.T) {
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "matrix B") {
			t.Fatalf("recovered %v; want a panic naming matrix B", r)
		}
	}()
	checkGemm(false, false, 2, 3, 4, 8, 4, 11, 3, 6, 3)
}

func toF32(x []float64) []float32 {
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}
