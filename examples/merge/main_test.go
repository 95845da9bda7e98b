package main

import (
	"os"
	"path/filepath"
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
	"peft/peft/safetensors"
	"peft/peft/stories260k"
)

// -adapter takes a folder as Hugging Face PEFT writes it (here: ours with the SDK's metadata
// record removed): the merged model written to -out loads as a plain model whose logits are the
// adapted model's.
func TestMergesAPEFTFolder(t *testing.T) {
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	rng := peft.NewRand(2)
	for _, tv := range m.TrainableVariables() {
		if tv.Variable.Name() == "B" {
			require.NoError(t, peft.SetFloat32s(tv.Variable, peft.Normal(rng, tv.Variable.Shape().Size(), 0.1)))
		}
	}
	ids := tensors.FromValue([][]int32{{1, 403, 407, 261, 378}})
	out, err := m.Call(ids)
	require.NoError(t, err)
	want := tensors.MustCopyFlatData[float32](out[0])

	saved := t.TempDir()
	require.NoError(t, m.Save(saved))
	adapterDir := t.TempDir()
	file, err := safetensors.Read(filepath.Join(saved, peft.AdapterWeightsFile))
	require.NoError(t, err)
	require.NoError(t, safetensors.Write(filepath.Join(adapterDir, peft.AdapterWeightsFile), file.Tensors, map[string]string{"format": "pt"}))
	config, err := os.ReadFile(filepath.Join(saved, peft.AdapterConfigFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(adapterDir, peft.AdapterConfigFile), config, 0o644))

	merged := filepath.Join(t.TempDir(), "merged")
	require.NoError(t, run("", adapterDir, merged))
	loaded := context.New()
	loadedCfg, err := llama.LoadPretrained(loaded, merged)
	require.NoError(t, err)
	plain, err := peft.NewModel(b, loaded, llama.CausalLM(loadedCfg), nil, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	out, err = plain.Call(ids)
	require.NoError(t, err)
	require.InDeltaSlice(t, want, tensors.MustCopyFlatData[float32](out[0]), 1e-5)
	_, err = os.Stat(filepath.Join(merged, "tokenizer.json"))
	require.NoError(t, err)
}
