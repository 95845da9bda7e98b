package goexec

import (
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
)

// ulps is the distance between two float32 values in units in the last place.
func ulps(a, b float32) int64 {
	ia, ib := int64(math.Float32bits(a)), int64(math.Float32bits(b))
	if ia < 0 {
		ia = math.MinInt32 - ia
	}
	if ib < 0 {
		ib = math.MinInt32 - ib
	}
	d := ia - ib
	if d < 0 {
		d = -d
	}
	return d
}

// sweep visits every 512th float32 bit pattern of [lo, hi] and the values around the edges.
func sweep(lo, hi float32, fn func(x float32)) {
	for _, x := range []float32{0, float32(math.Copysign(0, -1)), 1, -1, 88.7, 88.72, 88.73, 89, -87.3, -103.2, -103.97, -104, 103.9, 104, lo, hi} {
		fn(x)
	}
	for bits := uint32(0); bits < 0x7f800000; bits += 512 {
		for _, x := range []float32{math.Float32frombits(bits), -math.Float32frombits(bits)} {
			if x >= lo && x <= hi {
				fn(x)
			}
		}
	}
}

func TestExp32(t *testing.T) {
	var worst int64
	var off int
	sweep(-110, 95, func(x float32) {
		want := float32(math.Exp(float64(x)))
		got := exp32(x)
		if d := ulps(got, want); d > worst {
			worst = d
		}
		if got != want {
			off++
		}
	})
	if worst > 1 {
		t.Fatalf("exp32 is %d ulps from float32(math.Exp) somewhere: want ≤ 1", worst)
	}
	t.Logf("exp32: worst %d ulp, %d values not bit-identical to float32(math.Exp)", worst, off)
	for _, tc := range []struct{ x, want float32 }{
		{float32(math.Inf(1)), float32(math.Inf(1))}, {float32(math.Inf(-1)), 0}, {1000, float32(math.Inf(1))}, {-1000, 0},
	} {
		if got := exp32(tc.x); got != tc.want {
			t.Errorf("exp32(%g) = %g, want %g", tc.x, got, tc.want)
		}
	}
	if nan := exp32(float32(math.NaN())); nan == nan {
		t.Errorf("exp32(NaN) = %g", nan)
	}
}

func TestLogistic32(t *testing.T) {
	var worst int64
	sweep(-120, 120, func(x float32) {
		xd := float64(x)
		var want float32
		if xd >= 0 {
			want = float32(1 / (1 + math.Exp(-xd)))
		} else {
			want = float32(math.Exp(xd) / (1 + math.Exp(xd)))
		}
		if d := ulps(logistic32(x), want); d > worst {
			worst = d
		}
	})
	if worst > 1 {
		t.Fatalf("logistic32 is %d ulps from the float64 definition somewhere: want ≤ 1", worst)
	}
	if nan := logistic32(float32(math.NaN())); nan == nan {
		t.Errorf("logistic32(NaN) = %g", nan)
	}
}

// The graph ops run through the fast executors, in place or not, and agree with the stock ones
// within one ulp.
func TestUnaryOps(t *testing.T) {
	defer UninstallRowWise()
	backend := newBackend(t)
	in := make([]float32, 1000)
	for i := range in {
		in[i] = float32(i)/10 - 50
	}
	for name, fn := range map[string]func(x *graph.Node) *graph.Node{
		"Exp":      graph.Exp,
		"Logistic": graph.Logistic,
		"Exp of a temporary (in place)": func(x *graph.Node) *graph.Node {
			return graph.Exp(graph.MulScalar(x, 0.5))
		},
	} {
		t.Run(name, func(t *testing.T) {
			exec := func() []float32 {
				return tensors.MustCopyFlatData[float32](graph.MustNewExec(backend, fn).MustExec(tensors.FromFlatDataAndDimensions(in, 10, 100))[0])
			}
			want, got, took := stockThenRowWise(t, exec)
			if took == 0 {
				t.Fatal("the op did not take the fast executor")
			}
			for i := range want {
				if ulps(got[i], want[i]) > 1 {
					t.Fatalf("value %d (x=%g): %g, stock %g", i, in[i], got[i], want[i])
				}
			}
		})
	}
}

// The AVX2 kernels compute what the Go code computes (the same float64 operations; at most an
// ulp apart where the compiler fuses a multiply-add, as with GOAMD64=v3), on every length.
func TestAVX2MatchesGo(t *testing.T) {
	if !hasAVX2 {
		t.Skip("this CPU (or build) has no AVX2 kernels: the Go loops, checked above, run")
	}
	var xs []float32
	sweep(-120, 120, func(x float32) { xs = append(xs, x) })
	xs = append(xs, float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)))
	for _, k := range []struct {
		name string
		vec  func(in, out []float32)
		one  func(float32) float32
	}{{"exp", exp32s, exp32}, {"logistic", logistic32s, logistic32}} {
		for _, n := range []int{len(xs), 1, 3, 4, 5, 7, 9} {
			out := make([]float32, n)
			k.vec(xs[:n], out)
			off := 0
			for i, x := range xs[:n] {
				want := k.one(x)
				if want != want {
					if out[i] == out[i] {
						t.Fatalf("%s(%g) = %g, want NaN", k.name, x, out[i])
					}
					continue
				}
				if out[i] != want {
					off++
					if ulps(out[i], want) > 1 {
						t.Fatalf("%s(%g): AVX2 %g, Go %g", k.name, x, out[i], want)
					}
				}
			}
			if n == len(xs) {
				t.Logf("%s: %d values, %d not bit-identical to the Go code", k.name, n, off)
			}
		}
	}
}
