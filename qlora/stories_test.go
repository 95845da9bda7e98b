package qlora_test

import (
	"encoding/json"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
	"peft/qlora"
)

// goldenFloat32NLL is golden.json's mean cross-entropy of its greedy sequence under the float32
// model.
const goldenFloat32NLL = 0.39728868731037015

// goldenIDs returns golden.json's greedy sequence: its start ids and the 64 generated ids.
func goldenIDs(t testing.TB) []int {
	t.Helper()
	ids, err := stories260k.GoldenSequence()
	require.NoError(t, err)
	return ids
}

// storiesModel loads stories260K from fsys (float or 4-bit) and applies method as a causal LM.
func storiesModel(t testing.TB, fsys fs.FS, method peft.Method, pre qlora.Prequantized) (*peft.Model, llama.Config, qlora.Prequantized) {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	dequantized, loaded, err := qlora.Dequantized(fsys)
	require.NoError(t, err)
	cfg, err := llama.LoadPretrainedFS(ctx, dequantized)
	require.NoError(t, err)
	if q, ok := method.(*qlora.QLoRA); ok && pre != nil {
		q.UsePrequantized(pre)
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 8))
	require.NoError(t, err)
	return m, cfg, loaded
}

func goldenBatch(ids []int) peft.Batch {
	in := make([]int32, len(ids))
	for i, id := range ids {
		in[i] = int32(id)
	}
	return peft.Batch{
		Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(in, 1, len(in))},
		Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(in, 1, len(in))},
	}
}

// On the real pretrained stories260K: quantizing every linear layer but the (tied) head raises the
// golden sequence's loss a little above the float32 model's; QLoRA training on the sequence
// lowers it, and the 4-bit base is bit for bit unchanged afterwards.
func TestStoriesQuantizeAndTrain(t *testing.T) {
	ids := goldenIDs(t)
	q, err := qlora.New(qlora.DefaultConfig())
	require.NoError(t, err)
	m, _, _ := storiesModel(t, stories260k.FS(), q, nil)
	require.Len(t, q.QuantizedLayers(), 35)
	quantized, err := generate.MeanNLL(m, ids)
	require.NoError(t, err)
	t.Logf("golden mean NLL: float32 %.5f, NF4 %.5f", goldenFloat32NLL, quantized)
	require.Greater(t, quantized, goldenFloat32NLL)
	require.Less(t, quantized, goldenFloat32NLL+0.1)

	stored := pefttest.Snapshot(t, q.QuantizedVariables())
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 15, LearningRate: 1e-2, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("golden", []peft.Batch{goldenBatch(ids)}, true))
	require.NoError(t, err)
	trained, err := generate.MeanNLL(m, ids)
	require.NoError(t, err)
	t.Logf("after 15 QLoRA steps: %.5f", trained)
	require.Less(t, trained, quantized-0.05)
	require.Equal(t, stored, pefttest.Snapshot(t, q.QuantizedVariables()), "the 4-bit base changed during training")
	require.Equal(t, 8*m.Report().Trainable, peft.OptimizerStateBytes(m.Context()))
}

// The quantized model round-trips through a Hugging Face 4-bit folder: the 4-bit weights come back
// bit for bit, they load as their exact dequantization (and the plain model on them computes what
// QLoRA computed), QLoRA adopts them (UsePrequantized), and an adapter saved on the original
// loads onto the reloaded model with identical outputs.
func TestStoriesCheckpointRoundTrip(t *testing.T) {
	ids := goldenIDs(t)
	q1, err := qlora.New(qlora.DefaultConfig())
	require.NoError(t, err)
	m1, cfg, _ := storiesModel(t, stories260k.FS(), q1, nil)
	fresh, err := generate.MeanNLL(m1, ids)
	require.NoError(t, err)
	trainer, err := peft.NewTrainer(m1, peft.TrainConfig{Steps: 3, LearningRate: 1e-2, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("golden", []peft.Batch{goldenBatch(ids)}, true))
	require.NoError(t, err)

	dir := filepath.Join(t.TempDir(), "stories260K-nf4")
	require.NoError(t, qlora.SaveQuantized(dir, cfg, m1, stories260k.FS(), "tokenizer.json"))
	adapterDir := filepath.Join(t.TempDir(), "adapter")
	require.NoError(t, m1.Save(adapterDir))
	configJSON, err := os.ReadFile(filepath.Join(dir, "config.json"))
	require.NoError(t, err)
	var hf struct {
		Quantization map[string]any `json:"quantization_config"`
	}
	require.NoError(t, json.Unmarshal(configJSON, &hf))
	require.Equal(t, "bitsandbytes", hf.Quantization["quant_method"])
	require.Equal(t, "nf4", hf.Quantization["bnb_4bit_quant_type"])
	require.Equal(t, true, hf.Quantization["bnb_4bit_use_double_quant"])
	require.FileExists(t, filepath.Join(dir, "tokenizer.json"))

	// The plain model on the 4-bit folder: exact dequantized weights, QLoRA's fresh outputs.
	plain, cfg2, pre := storiesModel(t, os.DirFS(dir), nil, nil)
	require.Equal(t, cfg, cfg2)
	require.Len(t, pre, 35)
	for _, path := range q1.QuantizedLayers() {
		require.Equal(t, q1.Quantized(path), pre[path], path)
		layer := plain.Layout().Linear(path)
		w, err := peft.Float32s(layer.Weights(plain.Context()))
		require.NoError(t, err)
		deq := pre[path].Dequantize()
		for o := range layer.Out {
			for i := range layer.In {
				require.Equal(t, math.Float32bits(deq[o*layer.In+i]), math.Float32bits(w[i*layer.Out+o]), "%s[%d, %d]", path, o, i)
			}
		}
	}
	plainNLL, err := generate.MeanNLL(plain, ids)
	require.NoError(t, err)
	require.Equal(t, fresh, plainNLL)

	// QLoRA on the reloaded folder adopts the stored 4-bit weights and takes the adapter.
	q2, err := qlora.New(qlora.DefaultConfig())
	require.NoError(t, err)
	m2, _, _ := storiesModel(t, os.DirFS(dir), q2, pre)
	for _, path := range q1.QuantizedLayers() {
		require.Same(t, pre[path], q2.Quantized(path))
	}
	require.NoError(t, m2.Load(adapterDir))
	input := goldenBatch(ids).Inputs
	want, err := m1.Call(input...)
	require.NoError(t, err)
	got, err := m2.Call(input...)
	require.NoError(t, err)
	require.Equal(t, want[0].Value(), got[0].Value())

	// Prequantized weights that do not match the configuration or the model are refused.
	q3, err := qlora.New(func() qlora.Config { c := qlora.DefaultConfig(); c.BlockSize = 128; return c }())
	require.NoError(t, err)
	q3.UsePrequantized(pre)
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	dequantized, _, err := qlora.Dequantized(os.DirFS(dir))
	require.NoError(t, err)
	_, err = llama.LoadPretrainedFS(ctx, dequantized)
	require.NoError(t, err)
	_, err = peft.NewModel(b, ctx, llama.CausalLM(cfg), q3, shapes.Make(dtypes.Int32, 1, 8))
	require.ErrorContains(t, err, "set bnb_4bit_quant_type, bnb_4bit_blocksize and bnb_4bit_use_double_quant to the checkpoint's")
	q4, err := qlora.New(qlora.DefaultConfig())
	require.NoError(t, err)
	q4.UsePrequantized(pre)
	ctx = context.New()
	_, err = llama.LoadPretrainedFS(ctx, stories260k.FS()) // the float32 weights, not their dequantization
	require.NoError(t, err)
	_, err = peft.NewModel(b, ctx, llama.CausalLM(cfg), q4, shapes.Make(dtypes.Int32, 1, 8))
	require.ErrorContains(t, err, "does not dequantize to the model's weights")
}

// A 4-bit folder whose quant state disagrees with its tensors, or whose companion tensors lost
// their quant state, does not dequantize: the error names the weight.
func TestLoadPretrainedRejectsInconsistentCheckpoint(t *testing.T) {
	q, err := qlora.New(qlora.DefaultConfig())
	require.NoError(t, err)
	m, cfg, _ := storiesModel(t, stories260k.FS(), q, nil)
	dir := t.TempDir()
	require.NoError(t, qlora.SaveQuantized(dir, cfg, m, nil))
	config, err := os.ReadFile(filepath.Join(dir, "config.json"))
	require.NoError(t, err)
	good, err := safetensors.Read(filepath.Join(dir, "model.safetensors"))
	require.NoError(t, err)
	const name = "model.layers.2.mlp.down_proj.weight"
	for _, tc := range []struct {
		name   string
		mutate func(ts []safetensors.Tensor) []safetensors.Tensor
		want   string
	}{
		{"shape disagrees", func(ts []safetensors.Tensor) []safetensors.Tensor {
			for i := range ts {
				if ts[i].Name == name+".quant_state.bitsandbytes__nf4" {
					ts[i].Data = []byte(strings.Replace(string(ts[i].Data), `"shape": [64, 172]`, `"shape": [64, 170]`, 1))
					ts[i].Shape = []int{len(ts[i].Data)}
				}
			}
			return ts
		}, name + ": packed weight has 5504 bytes, the quant state's shape [64 170] needs 5440"},
		{"quant state missing", func(ts []safetensors.Tensor) []safetensors.Tensor {
			return slices.DeleteFunc(ts, func(t safetensors.Tensor) bool { return t.Name == name+".quant_state.bitsandbytes__nf4" })
		}, "a 4-bit weight without its quant state"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := tc.mutate(slices.Clone(good.Tensors))
			data, err := safetensors.Encode(ts, good.Metadata)
			require.NoError(t, err)
			_, _, err = qlora.Dequantized(fstest.MapFS{
				"config.json":       &fstest.MapFile{Data: config},
				"model.safetensors": &fstest.MapFile{Data: data},
			})
			require.ErrorContains(t, err, tc.want)
		})
	}
}
