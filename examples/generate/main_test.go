package main

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft/generate"
	"peft/peft/pefttest"
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
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	_, m := pefttest.StoriesModel(t, method)
	pefttest.SetRandomB(t, m, 1, 0.2)
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
	pefttest.WritePlainPEFT(t, dir, filepath.Join(parent, "my-task"))
	res = runJSON(t, parent)
	require.InDelta(t, want, res.PromptMeanNLL, 1e-9)
}
