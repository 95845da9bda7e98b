package lora_test

import (
	"bytes"
	"log"
	"math"
	"os"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/pefttest"
)

func newLoRA(t testing.TB, mutate func(*lora.Config)) *lora.LoRA {
	t.Helper()
	cfg := lora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	if mutate != nil {
		mutate(&cfg)
	}
	l, err := lora.New(cfg)
	require.NoError(t, err)
	return l
}

// The count users check against the LoRA paper: a RoBERTa-base-sized stack (12 layers, hidden
// 768) with r=8 on the query and value projections trains exactly 294,912 parameters.
func TestTrainableCountRoBERTaBaseShape(t *testing.T) {
	if testing.Short() {
		t.Skip("builds an 85M-parameter model")
	}
	cfg := llama.Config{VocabSize: 16, HiddenSize: 768, IntermediateSize: 3072, NumLayers: 12, NumHeads: 12,
		NumKVHeads: 12, MaxPositions: 16, RMSNormEps: 1e-5, RopeTheta: 10000, TieEmbeddings: true}
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, cfg, 0, 1))
	l := newLoRA(t, func(c *lora.Config) { c.ModulesToSave = nil })
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), l, shapes.Make(dtypes.Int32, 1, 4))
	require.NoError(t, err)
	report := m.Report()
	require.EqualValues(t, 294_912, report.Trainable)
	base := int64(16*768 + 12*(4*768*768+3*768*3072+2*768) + 768)
	require.Equal(t, base+294_912, report.All)
	require.Len(t, l.Targets(), 24)
	require.True(t, strings.HasPrefix(report.String(), "trainable params: 294,912 || all params: "), report.String())
}

func TestIdentityAtInit(t *testing.T) {
	for _, init := range []string{lora.InitKaiming, lora.InitGaussian} {
		t.Run(init, func(t *testing.T) {
			pefttest.CheckIdentityAtInit(t, newLoRA(t, func(c *lora.Config) {
				c.InitA = init
				c.TargetModules = peft.TargetPattern(peft.AllLinear)
			}))
		})
	}
}

func TestTrainingLearns(t *testing.T) {
	pefttest.CheckTrainingLearns(t, newLoRA(t, nil), 60, 1e-2, 0.8)
}

func TestSaveLoad(t *testing.T) {
	pefttest.CheckSaveLoad(t, func() peft.Method { return newLoRA(t, nil) })
}

func TestMergeUnmerge(t *testing.T) {
	l := newLoRA(t, func(c *lora.Config) { c.TargetModules = peft.TargetPattern(peft.AllLinear) })
	m := pefttest.NewModel(t, l)
	base := pefttest.Logits(t, m)
	// Give B values so the update is not zero.
	pefttest.SetRandomB(t, m, 5, 0.5)
	require.NotEqual(t, base, pefttest.Logits(t, m))
	pefttest.CheckMergeUnmerge(t, m)
}

// The scale is α/r, or α/√r with rsLoRA, and rank_pattern/alpha_pattern override per layer: the
// merged delta of a layer equals scale·A·B computed here by hand.
func TestScalingAndPatterns(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mutate    func(*lora.Config)
		path      string
		wantRank  int
		wantScale float64
	}{
		{"default", nil, "model.layers.0.self_attn.q_proj", 8, 1},
		{"rslora", func(c *lora.Config) { c.UseRSLoRA = true; c.Alpha = 16 }, "model.layers.0.self_attn.q_proj", 8, 16 / math.Sqrt(8)},
		{"rank pattern", func(c *lora.Config) {
			c.RankPattern = peft.Patterns[int]{{Key: `layers\.1\.self_attn\.v_proj`, Value: 2}}
		}, "model.layers.1.self_attn.v_proj", 2, 4},
		{"alpha pattern", func(c *lora.Config) { c.AlphaPattern = peft.Patterns[float64]{{Key: "q_proj", Value: 32}} }, "model.layers.1.self_attn.q_proj", 8, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLoRA(t, tc.mutate)
			m := pefttest.NewModel(t, l)
			require.Equal(t, tc.wantRank, l.Rank(tc.path))
			var a, b *context.Variable
			scope := m.Layout().Linear(tc.path).Scope + "/lora"
			a = m.Context().GetVariableByScopeAndName(scope, "A")
			b = m.Context().GetVariableByScopeAndName(scope, "B")
			require.NotNil(t, a)
			require.Equal(t, []int{32, tc.wantRank}, a.Shape().Dimensions)
			rng := peft.NewRand(9)
			require.NoError(t, peft.SetFloat32s(b, peft.Normal(rng, b.Shape().Size(), 1)))
			av, _ := peft.Float32s(a)
			bv, _ := peft.Float32s(b)
			delta, err := l.Delta(tc.path)
			require.NoError(t, err)
			out := b.Shape().Dim(1)
			for i := 0; i < 32; i++ {
				for j := 0; j < out; j++ {
					var sum float64
					for k := 0; k < tc.wantRank; k++ {
						sum += float64(av[i*tc.wantRank+k]) * float64(bv[k*out+j])
					}
					require.InDelta(t, tc.wantScale*sum, delta[i*out+j], 1e-5)
				}
			}
		})
	}
}

func TestKaimingInitBound(t *testing.T) {
	l := newLoRA(t, nil)
	m := pefttest.NewModel(t, l)
	a := m.Context().GetVariableByScopeAndName(m.Layout().Linear("model.layers.0.self_attn.q_proj").Scope+"/lora", "A")
	values, err := peft.Float32s(a)
	require.NoError(t, err)
	bound := 1 / math.Sqrt(32)
	maxAbs := 0.0
	for _, v := range values {
		maxAbs = math.Max(maxAbs, math.Abs(float64(v)))
	}
	require.LessOrEqual(t, maxAbs, bound)
	require.Greater(t, maxAbs, bound*0.8, "values should fill U(-1/√in, 1/√in)")
}

func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*lora.Config)
		want   string
	}{
		{"rank zero", func(c *lora.Config) { c.Rank = 0 }, "rank must be > 0"},
		{"rank negative", func(c *lora.Config) { c.Rank = -2 }, "rank must be > 0"},
		{"alpha zero", func(c *lora.Config) { c.Alpha = 0 }, "alpha must be > 0"},
		{"dropout one", func(c *lora.Config) { c.Dropout = 1 }, "dropout must be in [0, 1)"},
		{"dropout negative", func(c *lora.Config) { c.Dropout = -0.1 }, "dropout must be in [0, 1)"},
		{"init", func(c *lora.Config) { c.InitA = "xavier" }, `unknown init "xavier"`},
		{"no targets", func(c *lora.Config) { c.TargetModules = peft.Targets{} }, "no target modules"},
		{"bad regex", func(c *lora.Config) { c.TargetModules = peft.TargetPattern("q_proj(") }, "not a valid regular expression"},
		{"bad rank pattern", func(c *lora.Config) { c.RankPattern = peft.Patterns[int]{{Key: "q_proj", Value: 0}} }, "rank_pattern"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := lora.DefaultConfig()
			tc.mutate(&cfg)
			_, err := lora.New(cfg)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestTargetsMatchingNothing(t *testing.T) {
	for _, targets := range []peft.Targets{peft.TargetNames("query", "value"), peft.TargetPattern(`.*\.attention\..*`)} {
		err := pefttest.NewModelErr(newLoRA(t, func(c *lora.Config) { c.TargetModules = targets }))
		require.ErrorContains(t, err, "match no linear layer")
		require.ErrorContains(t, err, "model.layers.0.self_attn.q_proj", "the error should list the layers that exist")
	}
	err := pefttest.NewModelErr(newLoRA(t, func(c *lora.Config) { c.ModulesToSave = []string{"classifier"} }))
	require.ErrorContains(t, err, `"classifier" matches no module`)
}

func TestTargetSemantics(t *testing.T) {
	for _, tc := range []struct {
		name    string
		targets peft.Targets
		want    int
	}{
		{"names suffix", peft.TargetNames("q_proj", "v_proj"), 4},
		{"full path name", peft.TargetNames("model.layers.0.mlp.up_proj"), 1},
		{"partial name does not match", peft.TargetNames("proj"), 0},
		{"regex whole path", peft.TargetPattern(`model\.layers\.1\..*_proj`), 7},
		{"regex must match whole path", peft.TargetPattern(`q_proj`), 0},
		{"all-linear skips the head", peft.TargetPattern(peft.AllLinear), 14},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLoRA(t, func(c *lora.Config) { c.TargetModules = tc.targets })
			err := pefttest.NewModelErr(l)
			if tc.want == 0 {
				require.ErrorContains(t, err, "match no linear layer")
				return
			}
			require.NoError(t, err)
			require.Len(t, l.Targets(), tc.want)
			for _, p := range l.Targets() {
				require.NotEqual(t, "score", p)
			}
		})
	}
}

func TestLoadIntoDifferentShapes(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t, func(c *lora.Config) { c.ModulesToSave = nil }))
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))

	b, err := backend.Get()
	require.NoError(t, err)
	cfg := pefttest.Config()
	cfg.HiddenSize = 48
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, cfg, 2, 1))
	other, err := peft.NewModel(b, ctx, llama.Classifier(cfg, 2), newLoRA(t, func(c *lora.Config) { c.ModulesToSave = nil }),
		shapes.Make(dtypes.Int32, 2, 4))
	require.NoError(t, err)
	err = other.Load(dir)
	require.ErrorIs(t, err, peft.ErrOtherBase, "another base model: refused before anything else")
	err = other.Load(dir, peft.AllowOtherBase())
	require.ErrorContains(t, err, "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape [8 32]")
	require.ErrorContains(t, err, "the model expects [8 48]")
}

func TestLoadInFreshProcess(t *testing.T) {
	pefttest.CheckLoadInFreshProcess(t, "TestLoadInFreshProcess", func() peft.Method { return newLoRA(t, nil) })
}

// A rank above min(in, out) is allowed, as in PEFT, and said once in a log line.
func TestRankAboveLayerSizeIsLogged(t *testing.T) {
	var logged bytes.Buffer
	log.SetOutput(&logged)
	defer log.SetOutput(os.Stderr)
	m := pefttest.NewModel(t, newLoRA(t, func(c *lora.Config) { c.Rank = 20 })) // v_proj is 32 → 16
	require.Equal(t, 1, strings.Count(logged.String(), "\n"), logged.String())
	require.Contains(t, logged.String(), "the rank exceeds min(in, out) on 2 layer(s)")
	require.Contains(t, logged.String(), "model.layers.0.self_attn.v_proj (r=20, min(in, out)=16)")
	require.NotNil(t, m)
	logged.Reset()
	pefttest.NewModel(t, newLoRA(t, nil))
	require.Empty(t, logged.String())

	// An absurd rank (an adapter_config.json's "r": 100000000) is refused before anything is
	// allocated for it.
	method, err := lora.New(func() lora.Config { c := lora.DefaultConfig(); c.Rank = 100_000_000; return c }())
	require.NoError(t, err)
	err = pefttest.NewModelErr(method)
	require.ErrorContains(t, err, "lora: rank 100000000 on model.layers.0.self_attn.q_proj (32×32) would hold 6400000000 values, over 64 times the weight it adapts")
}
