package lora_test

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
	"peft/qlora"
)

func newDoRA(t testing.TB, mutate func(*lora.Config)) *lora.LoRA {
	t.Helper()
	return newLoRA(t, func(c *lora.Config) {
		c.UseDoRA = true
		if mutate != nil {
			mutate(c)
		}
	})
}

// doraLayer is lora/testdata/dora_layer.json, written by scripts/dora_reference.py from PEFT's
// DoraLinearLayer in PyTorch (float64).
type doraLayer struct {
	Out, In, R                 int
	Scale                      float64
	W, B, A, LoraB, M, X, C, Y []float64
	GradA, GradB, GradM        []float64
}

func (d *doraLayer) UnmarshalJSON(data []byte) error {
	var raw struct {
		Out, In, R int
		Scale      float64
		W          []float64 `json:"W"`
		Bias       []float64 `json:"b"`
		A          []float64 `json:"A"`
		B          []float64 `json:"B"`
		M          []float64 `json:"m"`
		X          []float64 `json:"x"`
		C          []float64 `json:"c"`
		Y          []float64 `json:"y"`
		GradA      []float64 `json:"grad_A"`
		GradB      []float64 `json:"grad_B"`
		GradM      []float64 `json:"grad_m"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	*d = doraLayer{Out: raw.Out, In: raw.In, R: raw.R, Scale: raw.Scale, W: raw.W, B: raw.Bias, A: raw.A,
		LoraB: raw.B, M: raw.M, X: raw.X, C: raw.C, Y: raw.Y, GradA: raw.GradA, GradB: raw.GradB, GradM: raw.GradM}
	return nil
}

func float32s(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}

// One DoRA layer against PEFT's formula computed by PyTorch in float64: the output, and the
// gradients of A, B and m, which match only with the column norm detached from the gradient.
func TestDoRALayerAgainstPEFTsFormula(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "dora_layer.json"))
	require.NoError(t, err)
	var ref doraLayer
	require.NoError(t, json.Unmarshal(data, &ref))
	in, out, r := ref.In, ref.Out, ref.R

	ctx := context.New()
	layer := &peft.LinearLayer{Path: "q_proj", Scope: "/q_proj", In: in, Out: out, UseBias: true, Layer: -1}
	dense := ctx.InAbsPath(layer.Scope).In("dense")
	peft.NewVariable(dense, "weights", peft.Transpose(float32s(ref.W), out, in), in, out) // ours is [in, out]
	peft.NewVariable(dense, "biases", float32s(ref.B), out)
	cfg := lora.DefaultConfig()
	cfg.Rank, cfg.Alpha, cfg.UseDoRA, cfg.TargetModules = r, ref.Scale*float64(r), true, peft.TargetNames("q_proj")
	l, err := lora.New(cfg)
	require.NoError(t, err)
	require.NoError(t, l.Init(ctx, &peft.Layout{Linears: []*peft.LinearLayer{layer}}))
	vars := peft.VariablesOf(l.Trainable(ctx))
	require.Len(t, vars, 3)
	a, b, m := vars[0], vars[1], vars[2]
	wantNorms := make([]float32, out)
	for j := range out {
		var s float64
		for i := range in {
			s += float64(float32(ref.W[j*in+i])) * float64(float32(ref.W[j*in+i]))
		}
		wantNorms[j] = float32(math.Sqrt(s))
	}
	got, err := peft.Float32s(m)
	require.NoError(t, err)
	require.Equal(t, wantNorms, got, "the magnitude must start at the column norms of W")
	require.NoError(t, peft.SetFloat32s(a, peft.Transpose(float32s(ref.A), r, in)))
	require.NoError(t, peft.SetFloat32s(b, peft.Transpose(float32s(ref.LoraB), out, r)))
	require.NoError(t, peft.SetFloat32s(m, float32s(ref.M)))

	bk, err := backend.Get()
	require.NoError(t, err)
	rows := len(ref.X) / in
	exec, err := context.NewExec(bk, ctx, func(ctx *context.Context, x, c *graph.Node) []*graph.Node {
		g := x.Graph()
		y := l.Adapt(ctx, layer, x, layer.Base(ctx, x), nil)
		loss := graph.ReduceAllSum(graph.Mul(y, c))
		grads := graph.Gradient(loss, a.ValueGraph(g), b.ValueGraph(g), m.ValueGraph(g))
		return append([]*graph.Node{y}, grads...)
	})
	require.NoError(t, err)
	outs, err := exec.Exec(tensors.FromFlatDataAndDimensions(float32s(ref.X), rows, in),
		tensors.FromFlatDataAndDimensions(float32s(ref.C), rows, out))
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		got  *tensors.Tensor
		want []float64
	}{
		{"output", outs[0], ref.Y},
		{"gradient of A", outs[1], peft.Transpose(ref.GradA, r, in)},
		{"gradient of B", outs[2], peft.Transpose(ref.GradB, out, r)},
		{"gradient of m", outs[3], ref.GradM},
	} {
		values := tensors.MustCopyFlatData[float32](tc.got)
		require.Len(t, values, len(tc.want), tc.name)
		worst := 0.0
		for i, w := range tc.want {
			require.InDelta(t, w, values[i], 2e-5*(1+math.Abs(w)), "%s, value %d", tc.name, i)
			worst = max(worst, math.Abs(float64(values[i])-w))
		}
		t.Logf("%s: max difference %.2g", tc.name, worst)
	}
}

// DoRA at initialization computes the base model: B = 0 and m = ‖W‖ make the gain 1 (up to the
// float32 rounding of the norm computed twice), on the float base and on the 4-bit one (QDoRA).
func TestDoRAIdentityAtInit(t *testing.T) {
	base := pefttest.Logits(t, pefttest.NewModel(t, nil))
	qdora, err := qlora.New(qlora.FromLoRA(doraConfig(t)))
	require.NoError(t, err)
	for _, tc := range []struct {
		name   string
		method peft.Method
		want   [][]float32
	}{
		{"dora", newDoRA(t, func(c *lora.Config) { c.TargetModules = peft.TargetPattern(peft.AllLinear) }), base},
		{"qdora", qdora, pefttest.Logits(t, pefttest.NewModel(t, quantOnly(t)))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := pefttest.Logits(t, pefttest.NewModel(t, tc.method))
			for i := range got {
				require.InDeltaSlice(t, tc.want[i], got[i], 1e-5)
			}
		})
	}
}

func doraConfig(t testing.TB) lora.Config {
	t.Helper()
	c := lora.DefaultConfig()
	c.UseDoRA = true
	c.TargetModules = peft.TargetPattern(peft.AllLinear)
	return c
}

// quantOnly is plain QLoRA, whose B = 0 leaves the outputs of its 4-bit base exactly: what QDoRA
// at initialization must compute.
func quantOnly(t testing.TB) peft.Method {
	t.Helper()
	c := qlora.FromLoRA(lora.DefaultConfig())
	q, err := qlora.New(c)
	require.NoError(t, err)
	return q
}

// With B and m moved away from their start, merged outputs agree with the unmerged ones (the
// merge computes m·(W + s·A·B)/‖W + s·A·B‖ directly, the forward pass as PEFT does, by parts), and
// Unmerge restores the weights exactly.
func TestDoRAMergeUnmerge(t *testing.T) {
	for _, tc := range []struct {
		name   string
		method func() peft.Method
	}{
		{"dora", func() peft.Method { return newDoRA(t, nil) }},
		{"qdora", func() peft.Method {
			q, err := qlora.New(qlora.FromLoRA(doraConfig(t)))
			require.NoError(t, err)
			return q
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := pefttest.NewModel(t, tc.method())
			pefttest.SetRandomB(t, m, 3, 0.1)
			rng := peft.NewRand(5)
			for _, tv := range m.TrainableVariables() {
				if v := tv.Variable; v.Name() == "magnitude" {
					values, err := peft.Float32s(v)
					require.NoError(t, err)
					for i, noise := range peft.Normal(rng, len(values), 0.2) {
						values[i] *= 1 + noise
					}
					require.NoError(t, peft.SetFloat32s(v, values))
				}
			}
			if tc.name == "dora" {
				pefttest.CheckMergeUnmerge(t, m)
				return
			}
			unmerged := pefttest.Logits(t, m)
			require.NoError(t, m.Merge())
			merged := pefttest.Logits(t, m)
			for i := range merged {
				require.InDeltaSlice(t, unmerged[i], merged[i], 1e-5)
			}
			require.NoError(t, m.Unmerge())
			require.Equal(t, unmerged, pefttest.Logits(t, m))
		})
	}
}

func TestDoRATrainingLearns(t *testing.T) {
	pefttest.CheckTrainingLearns(t, newDoRA(t, nil), 60, 1e-2, 0.8)
}

// The saved adapter is PEFT's DoRA layout: use_dora true and lora_magnitude_vector [out] beside
// lora_A and lora_B; it loads back bit for bit, and a model without DoRA refuses it.
func TestDoRASaveLoad(t *testing.T) {
	pefttest.CheckSaveLoad(t, func() peft.Method { return newDoRA(t, nil) })

	m := pefttest.NewModel(t, newDoRA(t, nil))
	pefttest.Train(t, m, 2, 1e-2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	fields, err := peft.ReadPEFTFields(dir)
	require.NoError(t, err)
	var useDoRA bool
	require.NoError(t, fields.Get("use_dora", &useDoRA))
	require.True(t, useDoRA)
	file, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	cfg := pefttest.Config()
	magnitudes := 0
	for _, layer := range m.Layout().Linears {
		if layer.Path != "model.layers.0.self_attn.q_proj" && layer.Path != "model.layers.0.self_attn.v_proj" &&
			layer.Path != "model.layers.1.self_attn.q_proj" && layer.Path != "model.layers.1.self_attn.v_proj" {
			continue
		}
		tensor, found := file.Get(peft.PEFTPrefix + layer.Path + ".lora_magnitude_vector")
		require.True(t, found, layer.Path)
		require.Equal(t, []int{layer.Out}, tensor.Shape, layer.Path)
		magnitudes++
	}
	require.Equal(t, 2*cfg.NumLayers, magnitudes)

	plain := pefttest.NewModel(t, newLoRA(t, nil))
	require.ErrorContains(t, plain.Load(dir), "use_dora is true, the model's method has false")
}
