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
	"peft/peft/llama"
	"peft/peft/pefttest"
)

// -adapter takes a folder as Hugging Face PEFT writes it (here: ours with the SDK's metadata
// record removed): the merged model written to -out loads as a plain model whose logits are the
// adapted model's.
func TestMergesAPEFTFolder(t *testing.T) {
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	_, m := pefttest.StoriesModel(t, method)
	pefttest.SetRandomB(t, m, 2, 0.1)
	ids := tensors.FromValue([][]int32{{1, 403, 407, 261, 378}})
	out, err := m.Call(ids)
	require.NoError(t, err)
	want := tensors.MustCopyFlatData[float32](out[0])

	saved := t.TempDir()
	require.NoError(t, m.Save(saved))
	adapterDir := t.TempDir()
	pefttest.WritePlainPEFT(t, saved, adapterDir)

	merged := filepath.Join(t.TempDir(), "merged")
	require.NoError(t, run("", adapterDir, merged))
	loaded := context.New()
	loadedCfg, err := llama.LoadPretrained(loaded, merged)
	require.NoError(t, err)
	plain, err := peft.NewModel(m.Backend(), loaded, llama.CausalLM(loadedCfg), nil, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	out, err = plain.Call(ids)
	require.NoError(t, err)
	require.InDeltaSlice(t, want, tensors.MustCopyFlatData[float32](out[0]), 1e-5)
	_, err = os.Stat(filepath.Join(merged, "tokenizer.json"))
	require.NoError(t, err)
}
