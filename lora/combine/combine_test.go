package combine

import (
	"encoding/json"
	"math"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"

	"peft/peft"
)

// golden is testdata/golden.json (see testdata/README.md).
type golden struct {
	Rules []struct {
		Name, Rule, Sign string
		Density          float64
		Weights          []float64
		Tensors          [][]float64
		Want             []float64
	}
	Signs struct {
		Tensors [][]float64
		Weights []float64
		Methods map[string]struct {
			Mask     [][]bool
			Disjoint []float64
		}
	}
	Layer struct {
		In, Out  int
		Weights  []float64
		Adapters []struct {
			Rank  int
			Scale float64
			A, B  []float64
		}
		Cases []struct {
			Type, Sign          string
			Density             float64
			Rank                int
			A, B, Delta, Merged []float64
			SingularValues      []float64 `json:"singular_values"`
		}
	}
	Quantiles []struct {
		X    []float64
		Q    float64
		Want float64
	}
}

func readGolden(t *testing.T) golden {
	t.Helper()
	data, err := os.ReadFile("testdata/golden.json")
	require.NoError(t, err)
	var g golden
	require.NoError(t, json.Unmarshal(data, &g))
	require.NotEmpty(t, g.Rules)
	return g
}

// requireClose checks |got − want| ≤ tol·max(1, |want|) entry by entry.
func requireClose[T float32 | float64](t *testing.T, want []float64, got []T, tol float64, msg string) {
	t.Helper()
	require.Len(t, got, len(want), msg)
	worst := 0.0
	for i, w := range want {
		worst = max(worst, math.Abs(float64(got[i])-w)/max(1, math.Abs(w)))
	}
	t.Logf("%s: worst relative difference %.3g", msg, worst)
	require.LessOrEqual(t, worst, tol, "%s: worst relative difference %g", msg, worst)
}

// PEFT's merge_utils on fixed tensors (float64, so the match is to rounding).
func TestMergeRulesMatchPEFT(t *testing.T) {
	rules := map[string]rule{"task_arithmetic": ruleTaskArithmetic, "magnitude_prune": ruleMagnitudePrune, "ties": ruleTIES}
	for _, c := range readGolden(t).Rules {
		t.Run(c.Name, func(t *testing.T) {
			m := merger{rule: rules[c.Rule], density: c.Density, sign: c.Sign}
			requireClose(t, c.Want, m.merge(c.Tensors, c.Weights), 1e-14, c.Name)
		})
	}
}

// calculate_majority_sign_mask and disjoint_merge, with zero entries (which have no sign).
func TestSignElectionAndDisjointMerge(t *testing.T) {
	s := readGolden(t).Signs
	for _, method := range []string{SignTotal, SignFrequency} {
		want := s.Methods[method]
		mask := majoritySignMask(s.Tensors, method)
		require.Equal(t, want.Mask, mask, method)
		requireClose(t, want.Disjoint, disjointMerge(s.Tensors, s.Weights, mask), 1e-14, method)
	}
}

// Two adapters (scales 2 and 0.5, weights 0.8 and −0.6) on one [4, 5] layer, against the
// transcription of add_weighted_adapter's two paths: A and B themselves for the factor-wise
// types; for the svd types the merged update's singular values and the rank-k product.
func TestLayersMatchPEFT(t *testing.T) {
	g := readGolden(t).Layer
	var adapters []*Adapter
	for _, a := range g.Adapters {
		adapters = append(adapters, &Adapter{Layers: []Layer{{Path: "l", In: g.In, Out: g.Out, Rank: a.Rank,
			A: float32s(a.A), B: float32s(a.B), Scale: a.Scale}}})
	}
	for _, c := range g.Cases {
		t.Run(c.Type, func(t *testing.T) {
			cfg := Config{Type: Type(c.Type), Weights: g.Weights, Density: c.Density, MajoritySign: c.Sign}
			if Type(c.Type).isSVD() {
				cfg.SVDRank = c.Rank
			}
			out, err := Combine(adapters, cfg)
			require.NoError(t, err)
			require.Len(t, out.Layers, 1)
			l := out.Layers[0]
			require.Equal(t, c.Rank, l.Rank)
			require.Equal(t, 1.0, l.Scale)
			if c.A != nil {
				requireClose(t, c.A, l.A, 1e-6, "A")
				requireClose(t, c.B, l.B, 1e-6, "B")
			} else {
				m := merger{rule: Type(c.Type).rule(), density: c.Density, sign: c.Sign}
				deltas := [][]float64{adapters[0].Layers[0].Delta(), adapters[1].Layers[0].Delta()}
				ws := []float64{g.Weights[0] * g.Adapters[0].Scale, g.Weights[1] * g.Adapters[1].Scale}
				requireClose(t, c.Merged, m.merge(deltas, ws), 1e-13, "merged update")
				var svd mat.SVD
				require.True(t, svd.Factorize(mat.NewDense(g.Out, g.In, m.merge(deltas, ws)), mat.SVDNone))
				requireClose(t, c.SingularValues, svd.Values(nil), 1e-12, "singular values")
			}
			requireClose(t, c.Delta, l.Delta(), 1e-5, "B·A")
		})
	}
}

func TestQuantileMatchesTorch(t *testing.T) {
	for _, c := range readGolden(t).Quantiles {
		require.InDelta(t, c.Want, quantile(append([]float64(nil), c.X...), c.Q), 1e-14, "q=%g", c.Q)
	}
}

// svd_clamp bounds every entry of both factors by the quantile of their entries.
func TestSVDClampBoundsFactors(t *testing.T) {
	a1, a2 := randomAdapter(1, 3, 6, 8, 1), randomAdapter(2, 3, 6, 8, 1)
	plain, err := Combine([]*Adapter{a1, a2}, Config{Type: SVD, Weights: []float64{1, 1}})
	require.NoError(t, err)
	clamped, err := Combine([]*Adapter{a1, a2}, Config{Type: SVD, Weights: []float64{1, 1}, SVDClamp: 0.8})
	require.NoError(t, err)
	p, c := plain.Layers[0], clamped.Layers[0]
	var all []float64
	for _, v := range [][]float32{p.A, p.B} {
		all = append(all, float64s(v)...)
	}
	hi := quantile(all, 0.8)
	changed := 0
	for i, v := range append(append([]float32(nil), c.B...), c.A...) {
		orig := append(append([]float32(nil), p.B...), p.A...)[i]
		require.LessOrEqual(t, math.Abs(float64(v)), hi+1e-6)
		if v != orig {
			changed++
			require.InDelta(t, math.Copysign(hi, float64(orig)), float64(v), 1e-6)
		}
	}
	require.Positive(t, changed)
}

// randomAdapter is an adapter with one layer "l" [out, in] of the given rank and scale.
func randomAdapter(seed uint64, rank, in, out int, scale float64) *Adapter {
	rng := peft.NewRand(seed)
	return &Adapter{Layers: []Layer{{Path: "l", In: in, Out: out, Rank: rank, Scale: scale,
		A: peft.Normal(rng, rank*in, 1), B: peft.Normal(rng, out*rank, 1)}}}
}

// With one adapter every type is linear (as in PEFT): weight 1 gives back its update, bit for
// bit when √s is exact (s = 4) and to float32 rounding otherwise.
func TestOneAdapterGivesItsDelta(t *testing.T) {
	for _, c := range []struct {
		typ     Type
		density float64
		scale   float64
		exact   bool
	}{
		{TIES, 1, 4, true}, {TIES, 0.2, 4, true}, {Linear, 0, 4, true}, {SVD, 0, 4, true}, {Cat, 0, 4, true},
		{DARETIES, 0.5, 4, true}, {MagnitudePrune, 0.3, 4, true}, {TIES, 1, 2, false}, {Linear, 0, 0.37, false},
	} {
		t.Run(string(c.typ), func(t *testing.T) {
			in := randomAdapter(3, 4, 6, 5, c.scale)
			out, err := Combine([]*Adapter{in}, Config{Type: c.typ, Weights: []float64{1}, Density: c.density})
			require.NoError(t, err)
			want, got := in.Layers[0].Delta(), out.Layers[0].Delta()
			if c.exact {
				require.Equal(t, want, got)
			} else {
				requireClose(t, want, got, 1e-6, "delta")
			}
			require.Equal(t, 4, out.Rank)
		})
	}
}

// cat is the weighted sum of the updates, for any ranks and scales; the rank is the sum of the
// ranks.
func TestCatIsWeightedSumOfDeltas(t *testing.T) {
	a1, a2 := randomAdapter(4, 2, 6, 5, 2), randomAdapter(5, 3, 6, 5, 0.25)
	w := []float64{0.6, -1.5}
	out, err := Combine([]*Adapter{a1, a2}, Config{Type: Cat, Weights: w})
	require.NoError(t, err)
	require.Equal(t, 5, out.Rank)
	d1, d2 := a1.Layers[0].Delta(), a2.Layers[0].Delta()
	want := make([]float64, len(d1))
	for i := range want {
		want[i] = w[0]*d1[i] + w[1]*d2[i]
	}
	requireClose(t, want, out.Layers[0].Delta(), 1e-6, "cat")
}

// A layer only some adapters adapt is combined from those; cat pads it with zeros to the new
// rank, as PEFT does.
func TestLayersOfSomeAdapters(t *testing.T) {
	a1 := randomAdapter(6, 2, 6, 5, 1)
	a2 := randomAdapter(7, 2, 6, 5, 1)
	a2.Layers[0].Path = "k"
	a1.Targets, a2.Targets = peft.TargetNames("l"), peft.TargetNames("k")
	out, err := Combine([]*Adapter{a1, a2}, Config{Type: Cat, Weights: []float64{2, 1}})
	require.NoError(t, err)
	require.Equal(t, peft.TargetNames("k", "l"), out.Targets)
	require.Equal(t, []string{"l", "k"}, []string{out.Layers[0].Path, out.Layers[1].Path})
	require.Equal(t, 4, out.Layers[0].Rank)
	require.Equal(t, make([]float32, 2*6), out.Layers[0].A[2*6:], "zero rows after the adapter's own")
	want := a1.Layers[0].Delta()
	for i := range want {
		want[i] *= 2
	}
	requireClose(t, want, out.Layers[0].Delta(), 1e-6, "l")
	requireClose(t, a2.Layers[0].Delta(), out.Layers[1].Delta(), 1e-6, "k")
}

// An update with known singular values 5, 3, 2, 1, split over two adapters (5, 3 in the first):
// svd at rank ≥ 4 gives it back, at rank k the best rank-k approximation (the k largest terms),
// whose factor B has the singular values as column norms.
func TestSVDIsBestLowRankApproximation(t *testing.T) {
	const in, out = 6, 8
	h := [8][8]float64{} // Hadamard, orthogonal columns of norm √8
	for i := range 8 {
		for j := range 8 {
			h[i][j] = 1
			for b := i & j; b != 0; b &= b - 1 {
				h[i][j] = -h[i][j]
			}
		}
	}
	r := 1 / math.Sqrt2
	v := [4][in]float64{{r, r}, {r, -r}, {0, 0, r, r}, {0, 0, 0, 0, 1}}
	sigma := []float64{5, 3, 2, 1}
	term := func(k int) *Layer { // σₖ·uₖ·vₖᵀ as a rank-1 layer
		l := &Layer{Path: "l", In: in, Out: out, Rank: 1, Scale: 1, A: float32s(v[k][:]), B: make([]float32, out)}
		for i := range out {
			l.B[i] = float32(sigma[k] * h[i][k] / math.Sqrt(8))
		}
		return l
	}
	join := func(ks ...int) *Adapter {
		var ls []*Layer
		for _, k := range ks {
			ls = append(ls, term(k))
		}
		c := concatenate(ls, []float64{1, 1}, 2)
		return &Adapter{Layers: []Layer{c}}
	}
	a1, a2 := join(0, 1), join(2, 3)
	sum := func(ks ...int) []float64 {
		d := make([]float64, in*out)
		for _, k := range ks {
			for i, x := range term(k).Delta() {
				d[i] += x
			}
		}
		return d
	}
	for _, c := range []struct {
		rank int
		want []float64
	}{{4, sum(0, 1, 2, 3)}, {5, sum(0, 1, 2, 3)}, {6, sum(0, 1, 2, 3)}, {3, sum(0, 1, 2)}, {2, sum(0, 1)}, {1, sum(0)}} {
		got, err := Combine([]*Adapter{a1, a2}, Config{Type: SVD, Weights: []float64{1, 1}, SVDRank: c.rank})
		require.NoError(t, err)
		l := got.Layers[0]
		require.Equal(t, c.rank, l.Rank)
		requireClose(t, c.want, l.Delta(), 1e-6, "rank-k approximation")
		for k := range min(c.rank, 4) {
			norm := 0.0
			for i := range out {
				norm += float64(l.B[i*l.Rank+k]) * float64(l.B[i*l.Rank+k])
			}
			require.InDelta(t, sigma[k], math.Sqrt(norm), 1e-5, "σ%d", k+1)
		}
	}
	def, err := Combine([]*Adapter{a1, a2}, Config{Type: SVD, Weights: []float64{1, 1}})
	require.NoError(t, err)
	require.Equal(t, 2, def.Rank, "svd_rank defaults to the largest input rank")
}

// DARE: density 1 is linear (and dare_ties is ties); at density p about a fraction p of each
// factor's entries is kept, each divided by p; the seed fixes the draw.
func TestDARE(t *testing.T) {
	a1, a2 := randomAdapter(8, 8, 500, 400, 2), randomAdapter(9, 8, 500, 400, 2)
	w := []float64{0.5, 0}
	for _, c := range []struct{ dare, plain Type }{{DARELinear, Linear}, {DARETIES, TIES}, {DARELinearSVD, SVD}} {
		plainCfg := Config{Type: c.plain, Weights: w}
		if c.plain == TIES {
			plainCfg.Density = 1
		}
		want, err := Combine([]*Adapter{a1, a2}, plainCfg)
		require.NoError(t, err)
		got, err := Combine([]*Adapter{a1, a2}, Config{Type: c.dare, Weights: w, Density: 1, Seed: 3})
		require.NoError(t, err)
		require.Equal(t, want.Layers, got.Layers, "%s at density 1", c.dare)
	}
	const p = 0.3
	got, err := Combine([]*Adapter{a1, a2}, Config{Type: DARELinear, Weights: w, Density: p, Seed: 3})
	require.NoError(t, err)
	l, in := got.Layers[0], a1.Layers[0]
	f := math.Sqrt(w[0] * in.Scale) // the factor-wise weight √(w·s), on A and B alike
	for name, pair := range map[string][2][]float32{"A": {in.A, l.A}, "B": {in.B, l.B}} {
		kept := 0
		for i, x := range pair[1] {
			if x != 0 {
				kept++
				require.InDelta(t, f*float64(pair[0][i])/p, float64(x), 1e-5*max(1, math.Abs(float64(x))))
			}
		}
		frac := float64(kept) / float64(len(pair[1]))
		require.InDelta(t, p, frac, 0.02, "%s kept fraction", name)
	}
	again, err := Combine([]*Adapter{a1, a2}, Config{Type: DARELinear, Weights: w, Density: p, Seed: 3})
	require.NoError(t, err)
	require.Equal(t, got.Layers, again.Layers, "same seed, same adapter")
	other, err := Combine([]*Adapter{a1, a2}, Config{Type: DARELinear, Weights: w, Density: p, Seed: 4})
	require.NoError(t, err)
	require.NotEqual(t, got.Layers[0].A, other.Layers[0].A, "another seed, another draw")
}

func TestErrorsNameTheProblem(t *testing.T) {
	r4, r2 := randomAdapter(1, 4, 6, 5, 1), randomAdapter(2, 2, 6, 5, 1)
	wide := randomAdapter(3, 4, 7, 5, 1)
	wide.Name = "wide-adapter"
	for _, c := range []struct {
		name     string
		adapters []*Adapter
		cfg      Config
		want     string
	}{
		{"linear ranks", []*Adapter{r4, r2}, Config{Type: Linear, Weights: []float64{1, 1}}, "needs adapters of one rank: adapter 0 has rank 4, adapter 1 has 2"},
		{"ties ranks", []*Adapter{r4, r2}, Config{Type: TIES, Weights: []float64{1, 1}, Density: 0.5}, "ties needs adapters of one rank"},
		{"unknown type", []*Adapter{r4, r2}, Config{Type: "average", Weights: []float64{1, 1}}, `unknown combination type "average"`},
		{"density above 1", []*Adapter{r4, r4}, Config{Type: TIES, Weights: []float64{1, 1}, Density: 1.5}, "density must be in (0, 1], got 1.5"},
		{"negative density", []*Adapter{r4, r4}, Config{Type: DARELinear, Weights: []float64{1, 1}, Density: -0.1}, "density must be in (0, 1], got -0.1"},
		{"density missing", []*Adapter{r4, r4}, Config{Type: MagnitudePrune, Weights: []float64{1, 1}}, "density is required by magnitude_prune"},
		{"density unused", []*Adapter{r4, r4}, Config{Type: Cat, Weights: []float64{1, 1}, Density: 0.5}, "density is used by the pruning types"},
		{"weights count", []*Adapter{r4, r2}, Config{Type: Cat, Weights: []float64{1}}, "1 weights for 2 adapters"},
		{"no weights", []*Adapter{r4, r2}, Config{Type: Cat}, "weights: give one weight per adapter"},
		{"NaN weight", []*Adapter{r4, r2}, Config{Type: Cat, Weights: []float64{1, math.NaN()}}, "weights[1] = NaN"},
		{"majority sign", []*Adapter{r4, r4}, Config{Type: TIES, Weights: []float64{1, 1}, Density: 1, MajoritySign: "mean"}, `majority_sign_method must be "total" or "frequency", got "mean"`},
		{"svd rank too large", []*Adapter{r4, r2}, Config{Type: SVD, Weights: []float64{1, 1}, SVDRank: 6}, "svd rank 6 exceeds min(in 6, out 5) of layer l"},
		{"svd rank for linear", []*Adapter{r4, r4}, Config{Type: Linear, Weights: []float64{1, 1}, SVDRank: 2}, "svd_rank is used by the svd types only"},
		{"clamp range", []*Adapter{r4, r4}, Config{Type: SVD, Weights: []float64{1, 1}, SVDClamp: 2}, "svd_clamp must be in (0, 1]"},
		{"shapes", []*Adapter{r4, wide}, Config{Type: Cat, Weights: []float64{1, 1}}, "layer l is [out 5, in 6] in adapter 0 but [out 5, in 7] in wide-adapter"},
		{"no adapters", nil, Config{Type: Cat, Weights: []float64{1}}, "no adapters to combine"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Combine(c.adapters, c.cfg)
			require.ErrorContains(t, err, c.want)
		})
	}
	bad := randomAdapter(1, 4, 6, 5, 1)
	bad.Layers[0].A = bad.Layers[0].A[1:]
	_, err := Combine([]*Adapter{bad, r4}, Config{Type: Cat, Weights: []float64{1, 1}})
	require.ErrorContains(t, err, "layer l: A has 23 values, [rank 4, in 6] needs 24")
}

// PEFT's target_modules of the result.
func TestUnionTargets(t *testing.T) {
	adapter := func(targets peft.Targets, paths ...string) *Adapter {
		a := &Adapter{Targets: targets}
		for _, p := range paths {
			a.Layers = append(a.Layers, Layer{Path: p})
		}
		return a
	}
	for _, c := range []struct {
		name string
		in   []*Adapter
		want peft.Targets
	}{
		{"names", []*Adapter{adapter(peft.TargetNames("v_proj", "q_proj")), adapter(peft.TargetNames("o_proj", "q_proj"))}, peft.TargetNames("o_proj", "q_proj", "v_proj")},
		{"patterns", []*Adapter{adapter(peft.TargetPattern(`.*\.q_proj`)), adapter(peft.TargetPattern(`.*\.v_proj`))}, peft.TargetPattern(`(.*\.q_proj)|(.*\.v_proj)`)},
		{"same pattern", []*Adapter{adapter(peft.TargetPattern(peft.AllLinear)), adapter(peft.TargetPattern(peft.AllLinear))}, peft.TargetPattern(peft.AllLinear)},
		{"mixed", []*Adapter{adapter(peft.TargetPattern(peft.AllLinear), "m.b", "m.a"), adapter(peft.TargetNames("a"), "m.a")}, peft.TargetNames("m.a", "m.b")},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.want, unionTargets(c.in))
		})
	}
}
