package peft_test

import (
	"math"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
)

func TestScheduleValidate(t *testing.T) {
	for _, tc := range []struct {
		name     string
		schedule peft.Schedule
		want     string // "" for valid
	}{
		{"constant, no steps", peft.Schedule{Decay: peft.ConstantDecay}, ""},
		{"constant, warmup beyond total", peft.Schedule{Decay: peft.ConstantDecay, WarmupSteps: 10, TotalSteps: 5}, ""},
		{"linear", peft.Schedule{Decay: peft.LinearDecay, WarmupSteps: 2, TotalSteps: 10, MinRatio: 0.1}, ""},
		{"cosine, ratio 1", peft.Schedule{Decay: peft.CosineDecay, TotalSteps: 1, MinRatio: 1}, ""},
		{"no decay", peft.Schedule{TotalSteps: 10}, `unknown learning-rate decay ""`},
		{"unknown decay", peft.Schedule{Decay: "step", TotalSteps: 10}, `unknown learning-rate decay "step" (want "constant", "linear" or "cosine")`},
		{"negative warmup", peft.Schedule{Decay: peft.ConstantDecay, WarmupSteps: -1}, "warmup steps (-1) and total steps (0) must be ≥ 0"},
		{"negative total", peft.Schedule{Decay: peft.ConstantDecay, TotalSteps: -3}, "warmup steps (0) and total steps (-3) must be ≥ 0"},
		{"linear, total = warmup", peft.Schedule{Decay: peft.LinearDecay, WarmupSteps: 5, TotalSteps: 5}, "linear decay needs total steps (5) > warmup steps (5)"},
		{"cosine, no steps", peft.Schedule{Decay: peft.CosineDecay}, "cosine decay needs total steps (0) > warmup steps (0)"},
		{"negative ratio", peft.Schedule{Decay: peft.LinearDecay, TotalSteps: 5, MinRatio: -0.1}, "minimum learning-rate ratio -0.1 must be in [0, 1]"},
		{"ratio above 1", peft.Schedule{Decay: peft.LinearDecay, TotalSteps: 5, MinRatio: 1.5}, "minimum learning-rate ratio 1.5 must be in [0, 1]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.schedule.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// TestScheduleFactor runs FactorGraph for steps 1… and compares with values computed by hand.
func TestScheduleFactor(t *testing.T) {
	cos30 := 0.5 * (1 + math.Cos(math.Pi/6)) // cosine factor at progress 1/6: 0.9330127
	for _, tc := range []struct {
		name     string
		schedule peft.Schedule
		want     map[int]float64 // step → factor
	}{
		{"linear warmup from 0, then linear decay to 0",
			peft.Schedule{WarmupSteps: 4, TotalSteps: 10, Decay: peft.LinearDecay},
			map[int]float64{1: 0.25, 2: 0.5, 3: 0.75, 4: 1, 5: 5.0 / 6, 7: 0.5, 9: 1.0 / 6, 10: 0, 11: 0, 20: 0}},
		{"linear decay without warmup",
			peft.Schedule{TotalSteps: 4, Decay: peft.LinearDecay},
			map[int]float64{1: 0.75, 2: 0.5, 3: 0.25, 4: 0, 5: 0}},
		{"linear decay to MinRatio",
			peft.Schedule{WarmupSteps: 2, TotalSteps: 6, Decay: peft.LinearDecay, MinRatio: 0.2},
			map[int]float64{1: 0.5, 2: 1, 3: 0.2 + 0.8*0.75, 4: 0.6, 6: 0.2, 8: 0.2}},
		{"cosine decay",
			peft.Schedule{WarmupSteps: 4, TotalSteps: 10, Decay: peft.CosineDecay},
			map[int]float64{1: 0.25, 4: 1, 5: cos30, 7: 0.5, 10: 0, 12: 0}},
		{"cosine decay to MinRatio",
			peft.Schedule{WarmupSteps: 4, TotalSteps: 10, Decay: peft.CosineDecay, MinRatio: 0.1},
			map[int]float64{2: 0.5, 5: 0.1 + 0.9*cos30, 7: 0.55, 10: 0.1, 30: 0.1}},
		{"constant",
			peft.Schedule{TotalSteps: 10, Decay: peft.ConstantDecay},
			map[int]float64{1: 1, 5: 1, 10: 1, 1000: 1}},
		{"constant with warmup",
			peft.Schedule{WarmupSteps: 5, Decay: peft.ConstantDecay},
			map[int]float64{1: 0.2, 2: 0.4, 5: 1, 6: 1, 100: 1}},
		{"constant ignores MinRatio",
			peft.Schedule{TotalSteps: 10, Decay: peft.ConstantDecay, MinRatio: 0.5},
			map[int]float64{10: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, tc.schedule.Validate())
			exec, err := graph.NewExec(testBackend(t), func(step *graph.Node) *graph.Node {
				return tc.schedule.FactorGraph(step)
			})
			require.NoError(t, err)
			defer exec.Finalize()
			for step, want := range tc.want {
				// The optimizer passes a float32 step; an integer step must work too.
				for _, arg := range []any{float32(step), int64(step)} {
					out, err := exec.Exec(arg)
					require.NoError(t, err)
					got, ok := out[0].Value().(float32)
					require.True(t, ok, "factor must be a float32 scalar, got %s", out[0].Shape())
					require.InDelta(t, want, float64(got), 1e-6, "step %d (%T)", step, arg)
				}
			}
		})
	}
}

// adamCase builds a context with one variable w = [1, -2] and the loss 3·w₀ + 4·w₁, whose
// gradient is (3, 4) with global norm 5, and runs `steps` AdamW updates.
type adamCase struct {
	name    string
	opt     peft.AdamW
	lrScale float64
	loss    func(w *graph.Node) *graph.Node // default: 3·w₀ + 4·w₁
	steps   int
	want    []float32
}

func runAdam(t *testing.T, tc adamCase) (ctx *context.Context, w *context.Variable) {
	t.Helper()
	ctx = context.New()
	w = peft.NewVariable(ctx.In("model").In("w"), "weights", []float32{1, -2}, 2)
	opt := tc.opt
	opt.Variables = func() []peft.TrainableVariable {
		return []peft.TrainableVariable{{Variable: w, LRScale: tc.lrScale}}
	}
	lossFn := tc.loss
	if lossFn == nil {
		lossFn = func(x *graph.Node) *graph.Node {
			return graph.ReduceAllSum(graph.Mul(x, graph.Const(x.Graph(), []float32{3, 4})))
		}
	}
	exec, err := context.NewExec(testBackend(t), ctx, func(ctx *context.Context, g *graph.Graph) *graph.Node {
		loss := lossFn(w.ValueGraph(g))
		opt.UpdateGraph(ctx, g, loss)
		return loss
	})
	require.NoError(t, err)
	defer exec.Finalize()
	for range tc.steps {
		_, err := exec.Exec()
		require.NoError(t, err)
	}
	return ctx, w
}

func TestAdamWStep(t *testing.T) {
	constant := peft.Schedule{Decay: peft.ConstantDecay}
	base := peft.AdamW{LearningRate: 0.1, Beta1: 0.9, Beta2: 0.999, Epsilon: 1e-8, Schedule: constant}
	with := func(mutate func(*peft.AdamW)) peft.AdamW {
		o := base
		mutate(&o)
		return o
	}
	// The first Adam step: m̂ = g, v̂ = g², so the update is g/(|g|+ε) ≈ sign(g).
	for _, tc := range []adamCase{
		{name: "first step moves by lr·sign(g)", opt: base, lrScale: 1, steps: 1,
			want: []float32{1 - 0.1, -2 - 0.1}},
		{name: "LRScale multiplies the step", opt: base, lrScale: 0.5, steps: 1,
			want: []float32{1 - 0.05, -2 - 0.05}},
		{name: "sign of the gradient", opt: base, lrScale: 1, steps: 1,
			loss: func(x *graph.Node) *graph.Node {
				return graph.ReduceAllSum(graph.Mul(x, graph.Const(x.Graph(), []float32{-3, 0.5})))
			},
			want: []float32{1 + 0.1, -2 - 0.1}},
		// With a constant gradient the debiased moments stay g and g²: each step moves lr·sign(g).
		{name: "three steps", opt: base, lrScale: 1, steps: 3,
			want: []float32{1 - 0.3, -2 - 0.3}},
		// A large ε makes the update depend on the gradient's size, which shows the clipping.
		// Without clipping: g = (3, 4), update = g/(|g|+0.2) = (3/3.2, 4/4.2).
		{name: "no clipping", opt: with(func(o *peft.AdamW) { o.Epsilon = 0.2 }), lrScale: 1, steps: 1,
			want: []float32{1 - 0.1*3/3.2, -2 - 0.1*4/4.2}},
		// Clipping the global norm 5 to 1: g = (0.6, 0.8), update = (0.6/0.8, 0.8/1.0).
		{name: "global-norm clipping", opt: with(func(o *peft.AdamW) { o.Epsilon = 0.2; o.ClipNorm = 1 }), lrScale: 1, steps: 1,
			want: []float32{1 - 0.1*0.75, -2 - 0.1*0.8}},
		// Clipping to 2.5: g = (1.5, 2), update = (1.5/1.7, 2/2.2).
		{name: "clip to 2.5", opt: with(func(o *peft.AdamW) { o.Epsilon = 0.2; o.ClipNorm = 2.5 }), lrScale: 1, steps: 1,
			want: []float32{1 - 0.1*1.5/1.7, -2 - 0.1*2/2.2}},
		// A norm below ClipNorm is left alone.
		{name: "norm below the clip", opt: with(func(o *peft.AdamW) { o.Epsilon = 0.2; o.ClipNorm = 10 }), lrScale: 1, steps: 1,
			want: []float32{1 - 0.1*3/3.2, -2 - 0.1*4/4.2}},
		// Decoupled weight decay adds wd·w to the update: (1 + 0.1·1, 1 + 0.1·(−2)).
		{name: "weight decay", opt: with(func(o *peft.AdamW) { o.WeightDecay = 0.1 }), lrScale: 1, steps: 1,
			want: []float32{1 - 0.1*1.1, -2 - 0.1*0.8}},
		// The schedule scales the rate: warmup over 4 steps gives factor 1/4 at step 1.
		{name: "schedule", opt: with(func(o *peft.AdamW) { o.Schedule = peft.Schedule{WarmupSteps: 4, Decay: peft.ConstantDecay} }),
			lrScale: 1, steps: 2, want: []float32{1 - 0.1*(0.25+0.5), -2 - 0.1*(0.25+0.5)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, w := runAdam(t, tc)
			got, err := peft.Float32s(w)
			require.NoError(t, err)
			require.InDeltaSlice(t, tc.want, got, 1e-5)
			require.EqualValues(t, 2*2*4, peft.OptimizerStateBytes(ctx), "two float32 moments of 2 values")
		})
	}
}

func TestAdamWNonFiniteStepChangesNothing(t *testing.T) {
	base := peft.AdamW{LearningRate: 0.1, Beta1: 0.9, Beta2: 0.999, Epsilon: 1e-8, ClipNorm: 1,
		Schedule: peft.Schedule{Decay: peft.ConstantDecay}}
	for _, tc := range []adamCase{
		{name: "NaN loss", opt: base, lrScale: 1, steps: 1,
			loss: func(x *graph.Node) *graph.Node {
				return graph.AddScalar(graph.ReduceAllSum(x), math.NaN()) // finite gradient, NaN loss
			}},
		{name: "Inf loss", opt: base, lrScale: 1, steps: 1,
			loss: func(x *graph.Node) *graph.Node { return graph.AddScalar(graph.ReduceAllSum(x), math.Inf(1)) }},
		{name: "Inf gradient, finite loss", opt: base, lrScale: 1, steps: 1,
			loss: func(x *graph.Node) *graph.Node {
				// d/dw √(w·0) at 0 is +Inf·0 … : √ of a zero has an infinite derivative.
				return graph.ReduceAllSum(graph.Sqrt(graph.MulScalar(x, 0)))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, w := runAdam(t, tc)
			got, err := peft.Float32s(w)
			require.NoError(t, err)
			require.Equal(t, []float32{1, -2}, got, "a non-finite step must leave the variable unchanged")
			for v := range ctx.IterVariables() {
				if v.DType() != dtypes.Float32 || v == w || !strings.HasSuffix(v.Name(), "_m1") && !strings.HasSuffix(v.Name(), "_m2") {
					continue
				}
				m, err := peft.Float32s(v)
				require.NoError(t, err)
				require.Equal(t, []float32{0, 0}, m, "moment %s must stay zero", v.ScopeAndName())
			}
		})
	}
}

func TestAdamWMomentsAndClear(t *testing.T) {
	opt := peft.AdamW{LearningRate: 0.1, Beta1: 0.9, Beta2: 0.999, Epsilon: 1e-8, Schedule: peft.Schedule{Decay: peft.ConstantDecay}}
	ctx, w := runAdam(t, adamCase{opt: opt, lrScale: 1, steps: 1})
	// After one step: m1 = 0.1·g, m2 = 0.001·g², under /peft_adamw/<variable scope>.
	m1 := ctx.GetVariableByScopeAndName("/peft_adamw"+w.Scope(), "weights_m1")
	m2 := ctx.GetVariableByScopeAndName("/peft_adamw"+w.Scope(), "weights_m2")
	require.NotNil(t, m1)
	require.NotNil(t, m2)
	require.False(t, m1.Trainable)
	v1, _ := peft.Float32s(m1)
	v2, _ := peft.Float32s(m2)
	require.InDeltaSlice(t, []float32{0.3, 0.4}, v1, 1e-6)
	require.InDeltaSlice(t, []float32{0.009, 0.016}, v2, 1e-7)
	require.NoError(t, opt.Clear(ctx))
	require.Zero(t, peft.OptimizerStateBytes(ctx))
	require.Nil(t, ctx.GetVariableByScopeAndName("/peft_adamw"+w.Scope(), "weights_m1"))
	require.NotNil(t, ctx.GetVariableByScopeAndName(w.Scope(), "weights"), "Clear keeps the model's variables")
}

func TestAdamWNoVariablesPanics(t *testing.T) {
	opt := peft.AdamW{LearningRate: 0.1, Beta1: 0.9, Beta2: 0.999, Schedule: peft.Schedule{Decay: peft.ConstantDecay},
		Variables: func() []peft.TrainableVariable { return nil }}
	err := peft.Catch("test", func() error {
		_, err := context.ExecOnce(testBackend(t), context.New(), func(ctx *context.Context, g *graph.Graph) *graph.Node {
			loss := graph.Scalar(g, dtypes.Float32, 1)
			opt.UpdateGraph(ctx, g, loss)
			return loss
		})
		return err
	})
	require.ErrorContains(t, err, "the method has no trainable variables")
}
