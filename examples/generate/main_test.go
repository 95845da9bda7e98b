package main

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
)

// runJSON runs the program with -json and decodes the last line of its stdout.
func runJSON(t *testing.T, adapterDir string) result {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	stdout := os.Stdout
	os.Stdout = w
	runErr := run("", "Once upon a time", 16, adapterDir, true, generate.Config{MaxNewTokens: 16})
	os.Stdout = stdout
	require.NoError(t, w.Close())
	out, err := io.ReadAll(r)
	require.NoError(t, err)
	require.NoError(t, runErr)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var res result
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &res), "last line: %q", lines[len(lines)-1])
	return res
}

// The JSON contract on the embedded stories260K: golden prompt ids, golden greedy continuation
// (golden.json's greedy16_text), and the prompt's mean NLL.
func TestJSONContract(t *testing.T) {
	res := runJSON(t, "")
	require.Equal(t, []int{1, 403, 407, 261, 378}, res.PromptIDs)
	require.Equal(t, []int{432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337}, res.GeneratedIDs)
	require.Equal(t, "Once upon a time, there was a little girl named Lily. She loved to play", res.Text)
	require.InDelta(t, 0.0685, res.PromptMeanNLL, 1e-3)
}

// With -adapter the saved method is applied: a LoRA whose B is not zero changes the prompt's NLL.
func TestAdapter(t *testing.T) {
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	rng := peft.NewRand(1)
	for _, tv := range m.TrainableVariables() {
		if tv.Variable.Name() == "B" {
			require.NoError(t, peft.SetFloat32s(tv.Variable, peft.Normal(rng, tv.Variable.Shape().Size(), 0.2)))
		}
	}
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	res := runJSON(t, dir)
	require.Equal(t, []int{1, 403, 407, 261, 378}, res.PromptIDs)
	want, err := generate.MeanNLL(m, res.PromptIDs)
	require.NoError(t, err)
	require.InDelta(t, want, res.PromptMeanNLL, 1e-9)
	require.Greater(t, res.PromptMeanNLL-0.0685, 0.01, "the adapter must change the model")

	// The same adapter as Hugging Face PEFT writes it (no record of ours in the metadata), in a
	// sub-folder as PEFT keeps adapters not named "default": -adapter names the parent folder.
	parent := t.TempDir()
	sub := filepath.Join(parent, "my-task")
	require.NoError(t, os.MkdirAll(sub, 0o755))
	file, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	stripped, err := safetensors.Encode(file.Tensors, map[string]string{"format": "pt"})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(sub, peft.AdapterWeightsFile), stripped, 0o644))
	config, err := os.ReadFile(filepath.Join(dir, peft.AdapterConfigFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(sub, peft.AdapterConfigFile), config, 0o644))
	res = runJSON(t, parent)
	require.InDelta(t, want, res.PromptMeanNLL, 1e-9)
}
