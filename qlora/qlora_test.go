package qlora_test

import (
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/bnb"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/qlora"
)

func newQLoRA(t testing.TB, mutate func(*qlora.Config)) *qlora.QLoRA {
	t.Helper()
	cfg := qlora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	if mutate != nil {
		mutate(&cfg)
	}
	q, err := qlora.New(cfg)
	require.NoError(t, err)
	return q
}

// dequantizedBase is the tiny base model (no method) with the weights of every layer q quantized
// replaced by their host-side dequantization: what a fresh QLoRA model must compute.
func dequantizedBase(t *testing.T, q *qlora.QLoRA) *peft.Model {
	t.Helper()
	base := pefttest.NewModel(t, nil)
	for _, layer := range base.Layout().Linears {
		stored := q.Quantized(layer.Path)
		if stored == nil {
			continue
		}
		values := stored.Dequantize() // [out, in]
		inOut := make([]float32, len(values))
		for o := range layer.Out {
			for i := range layer.In {
				inOut[i*layer.Out+o] = values[o*layer.In+i]
			}
		}
		require.NoError(t, peft.SetFloat32s(layer.Weights(base.Context()), inOut))
	}
	return base
}

type initCase struct {
	name   string
	mutate func(*qlora.Config)
}

var initCases = []initCase{
	{"nf4 64 double quant", nil},
	{"fp4 32", func(c *qlora.Config) { c.QuantType, c.BlockSize, c.DoubleQuant = bnb.FP4, 32, false }},
	{"nf4 4096 double quant, partial blocks", func(c *qlora.Config) { c.BlockSize = 4096 }},
	{"gaussian init, quantize only the MLP", func(c *qlora.Config) {
		c.InitA = lora.InitGaussian
		c.QuantizeModules = peft.TargetNames("gate_proj", "up_proj", "down_proj")
	}},
}

// A fresh QLoRA model computes bit for bit what the base computes with its weights replaced by
// their host-side dequantization: the in-graph dequantization equals the host's and B = 0 adds
// nothing. The float32 weights of quantized layers are gone, also after graphs were built.
func TestIdentityWithDequantizedBase(t *testing.T) {
	for _, tc := range initCases {
		t.Run(tc.name, func(t *testing.T) {
			q := newQLoRA(t, tc.mutate)
			m := pefttest.NewModel(t, q)
			got := pefttest.Logits(t, m)
			require.Equal(t, pefttest.Logits(t, dequantizedBase(t, q)), got)
			require.NotEqual(t, pefttest.Logits(t, pefttest.NewModel(t, nil)), got, "quantization should change the outputs a little")
			for _, layer := range m.Layout().Linears {
				if q.Quantized(layer.Path) != nil {
					require.Nil(t, layer.Weights(m.Context()), "%s still has float32 weights", layer.Path)
				} else {
					require.NotNil(t, layer.Weights(m.Context()), layer.Path)
				}
			}
		})
	}
}

// Counts computed by hand for the tiny model (hidden 32, intermediate 64, 2 layers, 2 KV heads of
// 8): LoRA r=8 on all seven projections of both layers plus the 32×2 score head; every projection
// quantized.
func TestCountsAndFrozenStorage(t *testing.T) {
	q := newQLoRA(t, nil)
	m := pefttest.NewModel(t, q)
	perLayer := 0
	for _, io := range [][2]int{{32, 32}, {32, 16}, {32, 16}, {32, 32}, {32, 64}, {32, 64}, {64, 32}} {
		perLayer += 8 * (io[0] + io[1])
	}
	require.Equal(t, 4096, perLayer)
	report := m.Report()
	require.EqualValues(t, 2*perLayer+32*2, report.Trainable)
	require.Len(t, q.Targets(), 14)
	require.Len(t, q.QuantizedLayers(), 14)
	weights := int64(2 * (32*32 + 32*16 + 32*16 + 32*32 + 3*32*64))
	require.Equal(t, weights, q.QuantizedParams())
	// Report's "all params" counts the quantized weights as the parameters they stand for, as
	// Hugging Face does, besides the base variables that still exist (embeddings, norms) and the
	// trainable ones: the same total as LoRA on the float base.
	require.Equal(t, weights+int64(64*32+2*2*32+32)+report.Trainable, report.All)
	loraCfg := qlora.DefaultConfig().Config
	loraCfg.ModulesToSave = []string{"score"}
	plain, err := lora.New(loraCfg)
	require.NoError(t, err)
	require.Equal(t, pefttest.NewModel(t, plain).Report().All, report.All)

	trainable := map[*context.Variable]bool{}
	for _, tv := range m.TrainableVariables() {
		trainable[tv.Variable] = true
	}
	var bytes int64
	for _, v := range q.QuantizedVariables() {
		require.False(t, v.Trainable, v.ScopeAndName())
		require.False(t, trainable[v], v.ScopeAndName())
		bytes += int64(v.Shape().Memory())
		if v.Name() == "packed" || v.Name() == "absmax" {
			require.Equal(t, dtypes.Uint8, v.DType(), v.ScopeAndName())
		}
	}
	require.Equal(t, bytes, q.QuantizedBytes())
	// Per layer: n/2 packed bytes, n/64 absmax codes, one nested absmax and the offset.
	var want int64
	for _, path := range q.QuantizedLayers() {
		n := int64(q.Quantized(path).Len())
		want += n/2 + n/64 + 4 + 4
	}
	require.Equal(t, want, bytes)
}

// Training lowers the held-out loss; the quantized weights and every other frozen base variable
// are bit for bit unchanged, and the optimizer holds state (two moments) for the adapter only.
func TestTrainingLearns(t *testing.T) {
	q := newQLoRA(t, nil)
	m := pefttest.NewModel(t, q)
	var frozen []*context.Variable
	for _, v := range m.Layout().BaseVariables {
		if current := m.Context().GetVariableByScopeAndName(v.Scope(), v.Name()); current == v && !v.Trainable {
			frozen = append(frozen, v)
		}
	}
	frozen = append(frozen, q.QuantizedVariables()...)
	before := pefttest.Snapshot(t, frozen)
	var trainVars []*context.Variable
	for _, tv := range m.TrainableVariables() {
		trainVars = append(trainVars, tv.Variable)
	}
	trainBefore := pefttest.Snapshot(t, trainVars)

	evalBefore, evalAfter := pefttest.Train(t, m, 60, 1e-2)
	t.Logf("eval loss %.4f → %.4f, accuracy %.3f → %.3f", evalBefore.Loss, evalAfter.Loss, evalBefore.Accuracy, evalAfter.Accuracy)
	require.Less(t, evalAfter.Loss, 0.8*evalBefore.Loss)
	require.Equal(t, before, pefttest.Snapshot(t, frozen), "frozen or quantized base weights changed")
	moved := 0
	for v, data := range pefttest.Snapshot(t, trainVars) {
		if string(data) != string(trainBefore[v]) {
			moved++
		}
	}
	require.Equal(t, len(trainVars), moved, "every adapter variable should train")
	require.Equal(t, 8*m.Report().Trainable, peft.OptimizerStateBytes(m.Context()))
}

func TestSaveLoad(t *testing.T) {
	pefttest.CheckSaveLoad(t, func() peft.Method { return newQLoRA(t, nil) })
}

func TestLoadInFreshProcess(t *testing.T) {
	pefttest.CheckLoadInFreshProcess(t, "TestLoadInFreshProcess", func() peft.Method { return newQLoRA(t, nil) })
}

// maxAbsDiff is the largest |a−b| over two logit matrices.
func maxAbsDiff(a, b [][]float32) float64 {
	var d float64
	for i := range a {
		for j := range a[i] {
			d = math.Max(d, math.Abs(float64(a[i][j])-float64(b[i][j])))
		}
	}
	return d
}

// Both merges: into float32 copies (the outputs agree up to float32 rounding) and re-quantized
// (the outputs change by what rounding the update costs, and the report says how much). Unmerge
// restores everything exactly.
func TestMerge(t *testing.T) {
	for _, mode := range []qlora.MergeMode{qlora.MergeDequantized, qlora.MergeRequantized} {
		t.Run(string(mode), func(t *testing.T) {
			q := newQLoRA(t, func(c *qlora.Config) {
				c.ModulesToSave = nil
				c.QuantizeModules = peft.TargetNames("q_proj", "k_proj", "o_proj", "mlp.up_proj")
			})
			m := pefttest.NewModel(t, q)
			pefttest.SetRandomB(t, m, 5, 0.05)
			unmerged := pefttest.Logits(t, m)
			stored := pefttest.Snapshot(t, q.QuantizedVariables())
			vLayer := m.Layout().Linear("model.layers.0.self_attn.v_proj") // adapted, not quantized
			vWeights, err := peft.Float32s(vLayer.Weights(m.Context()))
			require.NoError(t, err)

			report, err := qlora.Merge(m, mode, pefttest.ToyBatches(1, 99)[0].Inputs...)
			require.NoError(t, err)
			t.Log(report)
			require.True(t, m.Merged())
			require.Equal(t, mode, q.MergedMode())
			merged := pefttest.Logits(t, m)
			require.Equal(t, report.MaxAbsChange, maxAbsDiff(unmerged, merged))
			require.Equal(t, pefttest.Batch*2, report.Values)
			require.LessOrEqual(t, report.MeanAbsChange, report.MaxAbsChange)
			q0 := m.Layout().Linear("model.layers.0.self_attn.q_proj")
			if mode == qlora.MergeDequantized {
				require.Less(t, report.MaxAbsChange, 1e-5)
				require.NotNil(t, q0.Weights(m.Context()), "a dequantized merge holds float32 weights")
				require.Equal(t, stored, pefttest.Snapshot(t, q.QuantizedVariables()))
				require.ErrorContains(t, qlora.SaveQuantized(t.TempDir(), pefttest.Config(), m, nil), "llama.SaveHF")
			} else {
				require.Greater(t, report.MaxAbsChange, 0.0, "re-quantizing rounds the update")
				require.Nil(t, q0.Weights(m.Context()), "a re-quantized merge keeps 4-bit weights only")
				require.NotEqual(t, stored, pefttest.Snapshot(t, q.QuantizedVariables()))
			}
			_, err = qlora.Merge(m, mode, pefttest.ToyBatches(1, 99)[0].Inputs...)
			require.ErrorContains(t, err, "already merged")
			require.ErrorIs(t, m.Save(t.TempDir()), peft.ErrMerged)

			require.NoError(t, m.Unmerge())
			require.Equal(t, unmerged, pefttest.Logits(t, m))
			require.Equal(t, stored, pefttest.Snapshot(t, q.QuantizedVariables()))
			require.Nil(t, q0.Weights(m.Context()))
			after, err := peft.Float32s(vLayer.Weights(m.Context()))
			require.NoError(t, err)
			require.Equal(t, vWeights, after)
		})
	}
	q := newQLoRA(t, nil)
	require.ErrorContains(t, q.SetMergeMode("halfway"), `unknown merge mode "halfway"`)
	_, err := qlora.Merge(pefttest.NewModel(t, q), qlora.MergeDequantized)
	require.ErrorContains(t, err, "probe batch")
}

// With bfloat16 compute the base matmul runs in bfloat16: the outputs stay close to float32's.
func TestBFloat16Compute(t *testing.T) {
	f32 := pefttest.Logits(t, pefttest.NewModel(t, newQLoRA(t, nil)))
	bf16 := pefttest.Logits(t, pefttest.NewModel(t, newQLoRA(t, func(c *qlora.Config) { c.ComputeDType = qlora.BFloat16 })))
	require.NotEqual(t, f32, bf16)
	require.Less(t, maxAbsDiff(f32, bf16), 0.02)
}

func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*qlora.Config)
		want   string
	}{
		{"lora rank", func(c *qlora.Config) { c.Rank = 0 }, "qlora: lora: rank must be > 0"},
		{"lora dropout", func(c *qlora.Config) { c.Dropout = 1 }, "dropout must be in [0, 1)"},
		{"quant type", func(c *qlora.Config) { c.QuantType = "int4" }, `bnb_4bit_quant_type: unknown quant type "int4"`},
		{"block size not a power of two", func(c *qlora.Config) { c.BlockSize = 48 }, "bnb_4bit_blocksize must be a power of two from 32 to 4096, got 48"},
		{"block size too small", func(c *qlora.Config) { c.BlockSize = 16 }, "got 16"},
		{"block size too large", func(c *qlora.Config) { c.BlockSize = 8192 }, "got 8192"},
		{"compute dtype", func(c *qlora.Config) { c.ComputeDType = "float16" }, `bnb_4bit_compute_dtype must be "float32" or "bfloat16", got "float16"`},
		{"no quantize modules", func(c *qlora.Config) { c.QuantizeModules = peft.Targets{} }, "quantize_modules: no target modules given"},
		{"bad quantize pattern", func(c *qlora.Config) { c.QuantizeModules = peft.TargetPattern("q_proj(") }, "quantize_modules: target pattern"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := qlora.DefaultConfig()
			tc.mutate(&cfg)
			_, err := qlora.New(cfg)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// Errors found against the model: targets that match nothing, a head both quantized and trained
// in full, and applying QLoRA twice to one context.
func TestInitErrors(t *testing.T) {
	err := pefttest.NewModelErr(newQLoRA(t, func(c *qlora.Config) { c.QuantizeModules = peft.TargetNames("query") }))
	require.ErrorContains(t, err, "quantize_modules: target modules")
	require.ErrorContains(t, err, "match no linear layer")
	err = pefttest.NewModelErr(newQLoRA(t, func(c *qlora.Config) { c.TargetModules = peft.TargetNames("query") }))
	require.ErrorContains(t, err, "target modules")
	err = pefttest.NewModelErr(newQLoRA(t, func(c *qlora.Config) { c.QuantizeModules = peft.TargetNames("score", "q_proj") }))
	require.ErrorContains(t, err, "modules_to_save trains score in full, but quantize_modules quantizes it")

	m := pefttest.NewModel(t, newQLoRA(t, nil))
	_, err = peft.NewModel(m.Backend(), m.Context(), llama.Classifier(pefttest.Config(), 2), newQLoRA(t, nil),
		shapes.Make(dtypes.Int32, pefttest.Batch, pefttest.Seq))
	require.ErrorContains(t, err, "already holds quantized weights")
}
