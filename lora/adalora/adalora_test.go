package adalora_test

import (
	"math"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
)

// newAdaLoRA returns AdaLoRA with the defaults, TotalSteps 20 and the "score" head trained, as
// mutate changes it.
func newAdaLoRA(t testing.TB, mutate func(*adalora.Config)) *adalora.AdaLoRA {
	t.Helper()
	cfg := adalora.DefaultConfig()
	cfg.TotalSteps = 20
	cfg.ModulesToSave = []string{"score"}
	if mutate != nil {
		mutate(&cfg)
	}
	a, err := adalora.New(cfg)
	require.NoError(t, err)
	return a
}

// variable returns the adapter variable name of the layer at path.
func variable(t testing.TB, m *peft.Model, path, name string) *context.Variable {
	t.Helper()
	v := m.Context().GetVariableByScopeAndName(m.Layout().Linear(path).Scope+"/adalora", name)
	require.NotNil(t, v, "%s of %s", name, path)
	return v
}

// Trainable parameters are r·(in + out + 1) per adapted layer (P, Q and Λ), plus the head: on the
// tiny Llama (hidden 32, 2 kv heads of 8) q_proj is 32→32 and v_proj 32→16, so with r = 12 each
// layer has 12·65 + 12·49 = 1,368, two layers 2,736, and the 2-class head 64 more.
func TestTrainableCount(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*adalora.Config)
		want   int64
	}{
		{"default r=12", nil, 2*(12*65+12*49) + 64},
		{"r=4 without head", func(c *adalora.Config) { c.InitRank, c.TargetRank, c.ModulesToSave = 4, 2, nil }, 2 * (4*65 + 4*49)},
		{"all-linear r=2", func(c *adalora.Config) {
			c.InitRank, c.TargetRank, c.ModulesToSave = 2, 1, nil
			c.TargetModules = peft.TargetPattern(peft.AllLinear)
		}, 2 * 2 * ((32 + 32 + 1) + 2*(32+16+1) + (32 + 32 + 1) + 2*(32+64+1) + (64 + 32 + 1))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAdaLoRA(t, tc.mutate)
			m := pefttest.NewModel(t, a)
			require.Equal(t, tc.want, m.Report().Trainable)
			// State adds one mask [r] per layer to what trains.
			state := int64(0)
			for _, v := range a.State(m.Context()) {
				state += int64(v.Shape().Size())
			}
			require.Equal(t, tc.want+int64(len(a.Targets())*a.Config().(adalora.Config).InitRank), state)
			// Before any allocation the effective parameters are all the adapter's.
			head := int64(0)
			if len(a.Config().(adalora.Config).ModulesToSave) > 0 {
				head = 64
			}
			require.Equal(t, tc.want-head, a.EffectiveParams())
		})
	}
}

func TestIdentityAtInit(t *testing.T) {
	pefttest.CheckIdentityAtInit(t, newAdaLoRA(t, func(c *adalora.Config) { c.TargetModules = peft.TargetPattern(peft.AllLinear) }))
}

// Λ starts at zero and P, Q at N(0, 0.02²).
func TestInitValues(t *testing.T) {
	a := newAdaLoRA(t, nil)
	m := pefttest.NewModel(t, a)
	path := "model.layers.0.self_attn.q_proj"
	e, err := peft.Float32s(variable(t, m, path, "E"))
	require.NoError(t, err)
	require.Equal(t, make([]float32, 12), e)
	for _, name := range []string{"A", "B"} {
		values, err := peft.Float32s(variable(t, m, path, name))
		require.NoError(t, err)
		var sum, sq float64
		for _, v := range values {
			sum += float64(v)
			sq += float64(v) * float64(v)
		}
		n := float64(len(values))
		std := math.Sqrt(sq/n - (sum/n)*(sum/n))
		require.InDelta(t, 0.02, std, 0.003, "%s std", name)
	}
	mask, err := peft.Float32s(variable(t, m, path, "mask"))
	require.NoError(t, err)
	for _, v := range mask {
		require.Equal(t, float32(1), v)
	}
}

func TestTrainingLearns(t *testing.T) {
	pefttest.CheckTrainingLearns(t, newAdaLoRA(t, func(c *adalora.Config) { c.TotalSteps = 60; c.TInit = 10; c.TFinal = 10 }), 60, 5e-2, 0.8)
}

func TestSaveLoad(t *testing.T) {
	pefttest.CheckSaveLoad(t, func() peft.Method { return newAdaLoRA(t, nil) })
}

func TestLoadInFreshProcess(t *testing.T) {
	// TotalSteps 5: CheckLoadInFreshProcess trains 5 steps, so the saved adapter has its final,
	// frozen rank pattern (40 of 48 singular values kept).
	pefttest.CheckLoadInFreshProcess(t, "TestLoadInFreshProcess", func() peft.Method {
		return newAdaLoRA(t, func(c *adalora.Config) { c.TotalSteps = 5 })
	})
}

func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*adalora.Config)
		want   string
	}{
		{"total missing", func(c *adalora.Config) { c.TotalSteps = 0 }, "total_step is required and must be > 0 (the number of training steps), got 0"},
		{"total negative", func(c *adalora.Config) { c.TotalSteps = -5 }, "total_step is required and must be > 0 (the number of training steps), got -5"},
		{"tinit at the end", func(c *adalora.Config) { c.TotalSteps, c.TInit, c.TFinal = 100, 80, 20 }, "tinit 80 must be < total_step 100 − tfinal 20 = 80"},
		{"tinit past the end", func(c *adalora.Config) { c.TotalSteps, c.TInit = 10, 10 }, "tinit 10 must be < total_step 10 − tfinal 0 = 10"},
		{"tfinal covers all", func(c *adalora.Config) { c.TotalSteps, c.TFinal = 10, 10 }, "tinit 0 must be < total_step 10 − tfinal 10 = 0"},
		{"tinit negative", func(c *adalora.Config) { c.TInit = -1 }, "tinit must be ≥ 0, got -1"},
		{"tfinal negative", func(c *adalora.Config) { c.TFinal = -1 }, "tfinal must be ≥ 0, got -1"},
		{"target above initial", func(c *adalora.Config) { c.TargetRank = 13 }, "target_r 13 is above init_r 12"},
		{"initial rank zero", func(c *adalora.Config) { c.InitRank = 0 }, "init_r (initial rank) must be > 0, got 0"},
		{"target rank zero", func(c *adalora.Config) { c.TargetRank = 0 }, "target_r (target rank) must be > 0, got 0"},
		{"beta1 zero", func(c *adalora.Config) { c.Beta1 = 0 }, "beta1 must be in (0, 1), got 0"},
		{"beta1 one", func(c *adalora.Config) { c.Beta1 = 1 }, "beta1 must be in (0, 1), got 1"},
		{"beta2 negative", func(c *adalora.Config) { c.Beta2 = -0.1 }, "beta2 must be in (0, 1), got -0.1"},
		{"beta2 one", func(c *adalora.Config) { c.Beta2 = 1 }, "beta2 must be in (0, 1), got 1"},
		{"orth weight negative", func(c *adalora.Config) { c.OrthRegWeight = -1 }, "orth_reg_weight must be ≥ 0"},
		{"deltaT zero", func(c *adalora.Config) { c.DeltaT = 0 }, "deltaT must be ≥ 1, got 0"},
		{"alpha zero", func(c *adalora.Config) { c.Alpha = 0 }, "lora_alpha must be > 0"},
		{"alpha NaN", func(c *adalora.Config) { c.Alpha = math.NaN() }, "lora_alpha must be > 0"},
		{"dropout one", func(c *adalora.Config) { c.Dropout = 1 }, "lora_dropout must be in [0, 1), got 1"},
		{"dropout negative", func(c *adalora.Config) { c.Dropout = -0.1 }, "lora_dropout must be in [0, 1)"},
		{"no targets", func(c *adalora.Config) { c.TargetModules = peft.Targets{} }, "no target modules"},
		{"bad regex", func(c *adalora.Config) { c.TargetModules = peft.TargetPattern("q_proj(") }, "not a valid regular expression"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := adalora.DefaultConfig()
			cfg.TotalSteps = 100
			tc.mutate(&cfg)
			_, err := adalora.New(cfg)
			require.ErrorContains(t, err, tc.want)
			require.True(t, strings.HasPrefix(err.Error(), "adalora: "), err.Error())
		})
	}
	cfg := adalora.DefaultConfig()
	_, err := adalora.New(cfg)
	require.ErrorContains(t, err, "total_step is required", "DefaultConfig leaves TotalSteps to the user")
	cfg.TotalSteps = 1
	_, err = adalora.New(cfg)
	require.NoError(t, err, "one step is a valid schedule: the final allocation at step 1")
}

func TestTargetsMatchingNothing(t *testing.T) {
	err := pefttest.NewModelErr(newAdaLoRA(t, func(c *adalora.Config) { c.TargetModules = peft.TargetNames("query") }))
	require.ErrorContains(t, err, "match no linear layer")
	err = pefttest.NewModelErr(newAdaLoRA(t, func(c *adalora.Config) { c.ModulesToSave = []string{"classifier"} }))
	require.ErrorContains(t, err, `"classifier" matches no module`)
}

// The budget follows Hugging Face's cubic schedule. Expected values are worked out by hand for
// 4 matrices, r 12 → 8 (b(0) = 48, b_T = 32), T = 100, t_init = 10, t_final = 20 (span 70):
// b(t) = ⌊16·(1 − (t−10)/70)³⌋ + 32.
func TestBudgetSchedule(t *testing.T) {
	cfg := adalora.DefaultConfig()
	cfg.TotalSteps, cfg.TInit, cfg.TFinal, cfg.DeltaT = 100, 10, 20, 5
	for _, tc := range []struct {
		step   int
		budget int
		mask   bool
	}{
		{0, 48, false},
		{1, 48, false},
		{10, 48, false}, // t = t_init: still the initial budget, no masking
		{11, 47, false}, // 16·(69/70)³ = 15.32…: 32 + 15; 11 is no multiple of ΔT
		{15, 44, true},  // 16·(65/70)³ = 12.81…
		{20, 42, true},  // 16·(60/70)³ = 10.07…
		{45, 34, true},  // 16·(1/2)³ = 2 exactly
		{66, 32, false}, // 16·(14/70)³ = 0.128
		{79, 32, false}, // 16·(1/70)³ ≈ 0
		{80, 32, true},  // t = T − t_final: the target, whatever ΔT says (80 is a multiple anyway)
		{81, 32, true},  // frozen phase
		{100, 32, true}, // t = T
		{150, 32, true}, // past T
	} {
		budget, mask := cfg.Budget(4, tc.step)
		require.Equal(t, tc.budget, budget, "budget at step %d", tc.step)
		require.Equal(t, tc.mask, mask, "mask at step %d", tc.step)
	}
	// Hugging Face's defaults (t_init = t_final = 0, ΔT = 1) mask from step 1 and reach the target
	// at T; b(1) for T = 10, 10 matrices, 12 → 8: ⌊40·0.729⌋ + 80 = 109.
	cfg = adalora.DefaultConfig()
	cfg.TotalSteps = 10
	for step, want := range map[int]int{1: 109, 5: 85, 9: 80, 10: 80} {
		budget, mask := cfg.Budget(10, step)
		require.Equal(t, want, budget, "step %d", step)
		require.True(t, mask)
	}
	// Hugging Face computes in float64 and 0.6³ rounds to 0.21599999999999997: for 25 matrices,
	// r 16 → 1, T = 5, step 2 (1 − 2/5 = 0.6) its budget is int(375·0.21599999999999997 + 25) =
	// int(105.99…) = 105 (Python prints 105), one below the exact ⌊375·0.216⌋ + 25 = 106 that
	// x·x·x (rounding to 0.216) would give. We follow Hugging Face.
	cfg = adalora.DefaultConfig()
	cfg.InitRank, cfg.TargetRank, cfg.TotalSteps = 16, 1, 5
	budget, _ := cfg.Budget(25, 2)
	require.Equal(t, 105, budget)

	// The budget never grows.
	cfg = adalora.DefaultConfig()
	cfg.TotalSteps, cfg.TInit, cfg.TFinal = 1000, 100, 100
	prev := math.MaxInt
	for step := range 1100 {
		budget, _ := cfg.Budget(7, step)
		require.LessOrEqual(t, budget, prev)
		require.GreaterOrEqual(t, budget, 7*8)
		prev = budget
	}
}

// Training through the whole schedule on the toy task: every allocation keeps exactly the
// scheduled budget, the singular values it keeps are the highest-scoring ones, the masked Λ
// entries are zero, and the final rank pattern sums to the target budget.
func TestAllocation(t *testing.T) {
	const steps = 24
	a := newAdaLoRA(t, func(c *adalora.Config) {
		c.TargetModules = peft.TargetPattern(peft.AllLinear)
		c.InitRank, c.TargetRank = 6, 3
		c.TotalSteps, c.TInit, c.TFinal, c.DeltaT = steps, 4, 6, 2
	})
	cfg := a.Config().(adalora.Config)
	m := pefttest.NewModel(t, a)
	n := len(a.Targets())
	require.Equal(t, 14, n)
	var events []adalora.RankEvent
	a.OnRankPatternChange(func(e adalora.RankEvent) {
		events = append(events, e)
		want, _ := cfg.Budget(n, e.Step)
		require.Equal(t, want, e.Budget, "kept at step %d", e.Step)
		sum := 0
		for _, r := range e.Pattern {
			sum += r
		}
		require.Equal(t, e.Budget, sum)
		require.Equal(t, e.Pattern, a.RankPattern())
		// The kept singular values are the highest-scoring: every kept score ≥ every masked one.
		if scores := a.Scores(); scores != nil {
			lowestKept, highestMasked := float32(math.Inf(1)), float32(math.Inf(-1))
			for _, path := range a.Targets() {
				mask, err := peft.Float32s(variable(t, m, path, "mask"))
				require.NoError(t, err)
				for i, s := range scores[path] {
					if mask[i] == 1 {
						lowestKept = min(lowestKept, s)
					} else {
						highestMasked = max(highestMasked, s)
					}
				}
			}
			require.GreaterOrEqual(t, lowestKept, highestMasked, "step %d", e.Step)
		}
	})
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: steps, LearningRate: 1e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(8, 3), true))
	require.NoError(t, err)

	require.NotEmpty(t, events)
	last := events[len(events)-1]
	require.True(t, last.Final)
	require.Equal(t, steps-cfg.TFinal, last.Step)
	for _, e := range events {
		require.Greater(t, e.Step, cfg.TInit, "no masking during the warm-up")
		require.LessOrEqual(t, e.Step, steps-cfg.TFinal, "the pattern is frozen after T − t_final")
		require.True(t, e.Step%cfg.DeltaT == 0 || e.Final, "allocation at step %d off the ΔT grid", e.Step)
	}
	pattern := a.RankPattern()
	total := 0
	for _, path := range a.Targets() {
		total += pattern[path]
		e, err := peft.Float32s(variable(t, m, path, "E"))
		require.NoError(t, err)
		mask, err := peft.Float32s(variable(t, m, path, "mask"))
		require.NoError(t, err)
		for i := range e {
			if mask[i] == 0 {
				require.Zero(t, e[i], "masked Λ entry %d of %s", i, path)
			}
		}
	}
	require.Equal(t, cfg.TargetRank*n, total, "the final rank pattern sums to the target budget")
	require.Equal(t, last.Pattern, pattern)
	t.Logf("final rank pattern: %v", last)
}

// KeepTop keeps exactly the budget, the highest scores, breaking ties by position.
func TestKeepTop(t *testing.T) {
	nan := float32(math.NaN())
	for _, tc := range []struct {
		name   string
		scores []float32
		budget int
		want   []bool
	}{
		{"distinct", []float32{0.3, 0.1, 0.9, 0.5}, 2, []bool{false, false, true, true}},
		{"keep all", []float32{0.3, 0.1}, 2, []bool{true, true}},
		{"over budget", []float32{0.3, 0.1}, 5, []bool{true, true}},
		{"keep none", []float32{0.3, 0.1}, 0, []bool{false, false}},
		{"negative budget", []float32{0.3}, -1, []bool{false}},
		{"ties: exactly the budget, later kept", []float32{0, 0, 0, 0}, 3, []bool{false, true, true, true}},
		{"ties at the threshold", []float32{0.2, 0.5, 0.2, 0.2, 0.7}, 3, []bool{false, true, false, true, true}},
		{"NaN lowest", []float32{nan, 0.1, 0.2}, 2, []bool{false, true, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, adalora.KeepTop(tc.scores, tc.budget))
		})
	}
}

// lossOf evaluates the method's regularization term in a graph of its own.
func lossOf(t *testing.T, a *adalora.AdaLoRA, m *peft.Model) float64 {
	t.Helper()
	exec, err := context.NewExec(m.Backend(), m.Context(), func(ctx *context.Context, g *graph.Graph) *graph.Node {
		return a.Loss(ctx, g)
	})
	require.NoError(t, err)
	out, err := exec.Exec()
	require.NoError(t, err)
	return float64(out[0].Value().(float32))
}

// orthonormal returns a rows×cols matrix (row-major) with orthonormal columns (rows ≥ cols) or
// rows (rows < cols), made of scaled unit vectors on distinct coordinates with signs.
func orthonormal(rows, cols int, scale float32) []float32 {
	v := make([]float32, rows*cols)
	for k := range min(rows, cols) {
		sign := float32(1)
		if k%2 == 1 {
			sign = -1
		}
		v[k*cols+k] = sign * scale
	}
	return v
}

// The orthogonal term is γ·mean over the 2n factor matrices of ‖QQᵀ − I‖_F / ‖PᵀP − I‖_F: zero
// for orthonormal P and Q, and for P = c·orthonormal, Q orthonormal it is γ·(|c²−1|·√r)/2.
func TestOrthogonalRegularization(t *testing.T) {
	for _, tc := range []struct {
		name   string
		scaleA float32 // A = scaleA·orthonormal (nil scale: random init)
		scaleB float32
		want   float64 // NaN: just positive
	}{
		{"orthonormal", 1, 1, 0},
		{"P doubled", 1, 2, 0.5 * (3 * math.Sqrt(4)) / 2},
		{"both halved", 0.5, 0.5, 0.5 * (0.75*math.Sqrt(4) + 0.75*math.Sqrt(4)) / 2},
		{"random init", 0, 0, math.NaN()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAdaLoRA(t, func(c *adalora.Config) { c.InitRank, c.TargetRank = 4, 2 })
			m := pefttest.NewModel(t, a)
			if tc.scaleA != 0 {
				for _, path := range a.Targets() {
					av, bv := variable(t, m, path, "A"), variable(t, m, path, "B")
					require.NoError(t, peft.SetFloat32s(av, orthonormal(av.Shape().Dim(0), 4, tc.scaleA)))
					require.NoError(t, peft.SetFloat32s(bv, orthonormal(4, bv.Shape().Dim(1), tc.scaleB)))
				}
			}
			got := lossOf(t, a, m)
			if math.IsNaN(tc.want) {
				// N(0, 0.02²) factors are far from orthonormal: ‖·−I‖_F ≈ √r = 2 for each.
				require.InDelta(t, 0.5*2, got, 0.05)
				return
			}
			require.InDelta(t, tc.want, got, 1e-6)
		})
	}
}

// The regularization is part of the training loss: with γ large the trainer pulls P and Q toward
// orthonormal, so the term falls.
func TestOrthogonalRegularizationTrains(t *testing.T) {
	a := newAdaLoRA(t, func(c *adalora.Config) { c.OrthRegWeight = 5 })
	m := pefttest.NewModel(t, a)
	before := lossOf(t, a, m)
	pefttest.Train(t, m, 15, 2e-2)
	after := lossOf(t, a, m)
	t.Logf("orthogonal term %.4f → %.4f", before, after)
	require.Less(t, after, before*0.9)
}

func TestMergeUnmerge(t *testing.T) {
	a := newAdaLoRA(t, func(c *adalora.Config) { c.TargetModules = peft.TargetPattern(peft.AllLinear) })
	m := pefttest.NewModel(t, a)
	base := pefttest.Logits(t, m)
	// Give Λ values (some masked to zero, as the allocator leaves them) and P, Q larger ones.
	rng := peft.NewRand(5)
	for _, tv := range m.TrainableVariables() {
		v := tv.Variable
		switch v.Name() {
		case "E":
			values := peft.Normal(rng, v.Shape().Size(), 1)
			values[3], values[7] = 0, 0
			require.NoError(t, peft.SetFloat32s(v, values))
		case "A", "B":
			require.NoError(t, peft.SetFloat32s(v, peft.Normal(rng, v.Shape().Size(), 0.3)))
		}
	}
	require.NotEqual(t, base, pefttest.Logits(t, m))
	pefttest.CheckMergeUnmerge(t, m)
}

// The merged update is s·A·diag(E)·B with s = α/(r + 1e-5), computed here by hand.
func TestDelta(t *testing.T) {
	for _, tc := range []struct {
		name  string
		alpha float64
		rank  int
	}{
		{"defaults", 8, 12},
		{"alpha 32 r 4", 32, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAdaLoRA(t, func(c *adalora.Config) { c.Alpha, c.InitRank, c.TargetRank = tc.alpha, tc.rank, 1 })
			require.InDelta(t, tc.alpha/(float64(tc.rank)+1e-5), a.Scale(), 1e-12)
			m := pefttest.NewModel(t, a)
			path := "model.layers.1.self_attn.v_proj"
			ev := variable(t, m, path, "E")
			require.NoError(t, peft.SetFloat32s(ev, peft.Normal(peft.NewRand(3), tc.rank, 1)))
			av, _ := peft.Float32s(variable(t, m, path, "A"))
			bv, _ := peft.Float32s(variable(t, m, path, "B"))
			e, _ := peft.Float32s(ev)
			delta, err := a.Delta(path)
			require.NoError(t, err)
			in, out := 32, 16
			require.Len(t, delta, in*out)
			for i := range in {
				for j := range out {
					var sum float64
					for k := range tc.rank {
						sum += float64(av[i*tc.rank+k]) * float64(e[k]) * float64(bv[k*out+j])
					}
					require.InDelta(t, a.Scale()*sum, delta[i*out+j], 1e-7)
				}
			}
			_, err = a.Delta("model.layers.0.mlp.up_proj")
			require.ErrorContains(t, err, "not adapted")
		})
	}
}

// A trained adapter's rank pattern comes back with Load, in a model built from the same config.
func TestRankPatternSavedAndLoaded(t *testing.T) {
	newMethod := func() *adalora.AdaLoRA {
		return newAdaLoRA(t, func(c *adalora.Config) { c.TotalSteps, c.TFinal = 6, 2 })
	}
	a := newMethod()
	m := pefttest.NewModel(t, a)
	pefttest.Train(t, m, 6, 1e-2)
	pattern := a.RankPattern()
	sum := 0
	for _, r := range pattern {
		sum += r
	}
	require.Equal(t, 4*8, sum)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))

	fresh := newMethod()
	fm := pefttest.NewModel(t, fresh)
	require.Equal(t, map[string]int{
		"model.layers.0.self_attn.q_proj": 12, "model.layers.0.self_attn.v_proj": 12,
		"model.layers.1.self_attn.q_proj": 12, "model.layers.1.self_attn.v_proj": 12,
	}, fresh.RankPattern())
	require.NoError(t, fm.Load(dir))
	require.Equal(t, pattern, fresh.RankPattern())
	require.Equal(t, a.EffectiveParams(), fresh.EffectiveParams())
	require.Equal(t, pefttest.Logits(t, m), pefttest.Logits(t, fm))
}

// storiesIDs returns the golden greedy sequence of stories260K (<s> and 64 generated ids).
func storiesIDs(t testing.TB) []int {
	t.Helper()
	ids, err := stories260k.GoldenSequence()
	require.NoError(t, err)
	return ids
}

// loadStories builds the real pretrained stories260K language model with method applied.
func loadStories(t testing.TB, method peft.Method, seq int) *peft.Model {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, seq))
	require.NoError(t, err)
	return m
}

// shifted returns a "new style" sequence for the pretrained model to learn: the golden ids with
// each id > 2 replaced by the next id (mod the vocabulary), so the model starts far from it.
func shifted(ids []int, vocab int) []int {
	out := make([]int, len(ids))
	for i, id := range ids {
		out[i] = id
		if id > 2 {
			out[i] = 3 + (id-3+1)%(vocab-3)
		}
	}
	return out
}

// On the real pretrained stories260K, AdaLoRA learns a sequence the model does not know: the
// mean next-token loss falls by more than half, and the final rank pattern sums to the target.
func TestStories260KLossFalls(t *testing.T) {
	ids := shifted(storiesIDs(t), 512)
	const steps = 40
	a := newAdaLoRA(t, func(c *adalora.Config) {
		c.ModulesToSave = nil
		c.TargetModules = peft.TargetPattern(peft.AllLinear)
		c.TotalSteps, c.TInit, c.TFinal, c.DeltaT = steps, 5, 10, 1
	})
	m := loadStories(t, a, len(ids))
	before, err := generate.MeanNLL(m, ids)
	require.NoError(t, err)
	input := make([]int32, len(ids))
	for i, id := range ids {
		input[i] = int32(id)
	}
	batch := peft.Batch{
		Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(input, 1, len(ids))},
		Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(input, 1, len(ids))},
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: steps, LearningRate: 1e-2, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("shifted", []peft.Batch{batch}, true))
	require.NoError(t, err)
	after, err := generate.MeanNLL(m, ids)
	require.NoError(t, err)
	t.Logf("stories260K shifted-sequence NLL %.3f → %.3f; rank pattern %v", before, after, a.RankPattern())
	require.Less(t, after, before/2)
	sum := 0
	for _, r := range a.RankPattern() {
		sum += r
	}
	require.Equal(t, 8*len(a.Targets()), sum)
	require.Equal(t, 35, len(a.Targets()))
}

// allocatorVar returns the allocator's bookkeeping variable name of the layer at path.
func allocatorVar(t testing.TB, m *peft.Model, path, name string) []float32 {
	t.Helper()
	v := m.Context().GetVariableByScopeAndName(m.Layout().Linear(path).Scope+"/adalora/allocator", name)
	require.NotNil(t, v, "%s of %s", name, path)
	values, err := peft.Float32s(v)
	require.NoError(t, err)
	return values
}

// The importance averages follow I = |p·g| (p after the optimizer step), Ī ← β1·Ī + (1−β1)·I,
// Ū ← β2·Ū + (1−β2)·|I − Ī|, and the triplet score is s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki),
// recomputed here on the host from the kept gradients and values after each of two steps.
func TestImportanceScores(t *testing.T) {
	a := newAdaLoRA(t, func(c *adalora.Config) { c.Beta1, c.Beta2, c.TInit = 0.7, 0.9, 5 })
	m := pefttest.NewModel(t, a)
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 20, LearningRate: 1e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
	require.NoError(t, err)
	ds := peft.NewDataset("train", pefttest.ToyBatches(4, 3), true)
	path := "model.layers.1.self_attn.q_proj"
	in, out, r := 32, 32, 12
	ipt := map[string][]float64{"A": make([]float64, in*r), "E": make([]float64, r), "B": make([]float64, r*out)}
	unc := map[string][]float64{"A": make([]float64, in*r), "E": make([]float64, r), "B": make([]float64, r*out)}
	for step := 1; step <= 2; step++ {
		_, err = trainer.TrainSteps(ds, 1)
		require.NoError(t, err)
		s := map[string][]float64{}
		for _, name := range []string{"A", "E", "B"} {
			p, err := peft.Float32s(variable(t, m, path, name))
			require.NoError(t, err)
			g := allocatorVar(t, m, path, name+"_grad")
			nonzero := false
			for i := range p {
				imp := math.Abs(float64(p[i]) * float64(g[i]))
				ipt[name][i] = 0.7*ipt[name][i] + 0.3*imp
				unc[name][i] = 0.9*unc[name][i] + 0.1*math.Abs(imp-ipt[name][i])
				s[name] = append(s[name], ipt[name][i]*unc[name][i])
				nonzero = nonzero || g[i] != 0
			}
			// Λ = 0 at step 1 still gets a gradient (P and Q get theirs from the orthogonal term).
			require.True(t, nonzero, "step %d: no gradient kept for %s", step, name)
			gotIpt, gotUnc := allocatorVar(t, m, path, name+"_ipt"), allocatorVar(t, m, path, name+"_unc")
			for i := range gotIpt {
				require.InDelta(t, ipt[name][i], gotIpt[i], 1e-6*math.Max(1e-3, math.Abs(ipt[name][i]))+1e-12)
				require.InDelta(t, unc[name][i], gotUnc[i], 1e-6*math.Max(1e-3, math.Abs(unc[name][i]))+1e-12)
			}
		}
		scores := a.Scores()[path]
		require.Len(t, scores, r)
		for k := range r {
			var meanQ, meanP float64
			for j := range in {
				meanQ += s["A"][j*r+k] / float64(in)
			}
			for j := range out {
				meanP += s["B"][k*out+j] / float64(out)
			}
			want := s["E"][k] + meanQ + meanP
			require.InDelta(t, want, scores[k], 1e-5*want+1e-15, "step %d, triplet %d", step, k)
			require.Greater(t, want, 0.0)
		}
	}
}

// As in Hugging Face, masking zeroes Λ itself and the forward uses Λ as it is: between two
// allocations (ΔT = 2) the optimizer regrows masked entries, the next allocation zeroes them
// again, and in the frozen phase they are zeroed after every step.
func TestMaskedEntriesBetweenAllocations(t *testing.T) {
	a := newAdaLoRA(t, func(c *adalora.Config) { c.TotalSteps, c.TInit, c.TFinal, c.DeltaT = 12, 0, 4, 2 })
	m := pefttest.NewModel(t, a)
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 12, LearningRate: 1e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
	require.NoError(t, err)
	ds := peft.NewDataset("train", pefttest.ToyBatches(4, 3), true)
	// maskedNonZero counts masked Λ entries that are not zero.
	maskedNonZero := func() (masked, nonZero int) {
		for _, path := range a.Targets() {
			e, err := peft.Float32s(variable(t, m, path, "E"))
			require.NoError(t, err)
			mask, err := peft.Float32s(variable(t, m, path, "mask"))
			require.NoError(t, err)
			for i := range e {
				if mask[i] == 0 {
					masked++
					if e[i] != 0 {
						nonZero++
					}
				}
			}
		}
		return masked, nonZero
	}
	for step := 1; step <= 12; step++ {
		_, err := trainer.TrainSteps(ds, 1)
		require.NoError(t, err)
		masked, nonZero := maskedNonZero()
		switch {
		case step == 1: // no allocation yet (1 is odd)
			require.Zero(t, masked)
		case step%2 == 0 || step >= 8: // an allocation step, or the frozen phase
			require.Positive(t, masked, "step %d", step)
			require.Zero(t, nonZero, "step %d: masked entries must be zero", step)
		default: // between allocations: the step regrew the masked entries
			require.Equal(t, masked, nonZero, "step %d", step)
		}
	}
}
