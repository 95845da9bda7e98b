package lora_test

import (
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
)

// loadLlama loads a Hugging Face Llama folder (the embedded stories260K when dir is "") with
// method applied.
func loadLlama(t *testing.T, dir string, method peft.Method) (llama.Config, *peft.Model) {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	var cfg llama.Config
	if dir == "" {
		cfg, err = llama.LoadPretrainedFS(ctx, stories260k.FS())
	} else {
		cfg, err = llama.LoadPretrained(ctx, dir)
	}
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 8))
	require.NoError(t, err)
	return cfg, m
}

// A LoRA merged into the real stories260K model and written as a Hugging Face folder loads back,
// without the adapter, with the merged model's logits within 1e-5.
func TestMergedHuggingFaceExportLoadsBack(t *testing.T) {
	lcfg := lora.DefaultConfig()
	lcfg.TargetModules = peft.TargetPattern(peft.AllLinear)
	method, err := lora.New(lcfg)
	require.NoError(t, err)
	cfg, m := loadLlama(t, "", method)
	pefttest.SetRandomB(t, m, 3, 0.05)
	ids := tensors.FromValue([][]int32{{1, 403, 407, 261, 378, 432, 383, 286}})
	call := func(m *peft.Model) [][]float32 {
		out, err := m.Call(ids)
		require.NoError(t, err)
		return out[0].Value().([][][]float32)[0]
	}
	_, baseModel := loadLlama(t, "", nil)
	base := call(baseModel)
	require.NoError(t, m.Merge())
	merged := call(m)
	dir := t.TempDir()
	require.NoError(t, llama.SaveHF(dir, cfg, m.Context(), stories260k.FS(), "tokenizer.json"))

	_, loaded := loadLlama(t, dir, nil)
	reloaded := call(loaded)
	changed := 0.0
	for p := range merged {
		require.InDeltaSlice(t, merged[p], reloaded[p], 1e-5)
		for v := range merged[p] {
			changed = math.Max(changed, math.Abs(float64(merged[p][v]-base[p][v])))
		}
	}
	require.Greater(t, changed, 0.01, "the adapter must change the model, or the test proves nothing")
}
